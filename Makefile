# dsv3 — build, test and benchmark.  `make` builds build/dsv3; `make test` runs every test (then
# again under AddressSanitizer + UndefinedBehaviorSanitizer); `make bench` prints the figures.
CC      ?= gcc
BUILD   ?= build
OPT     ?= -O2
CFLAGS  ?= $(OPT) -g
CFLAGS  += -std=gnu11 -Wall -Wextra -fopenmp -Isrc -MMD -MP
LDLIBS  += -lopenblas -ldnnl -ljansson -lpcre2-8 -lmicrohttpd -lpthread -lm
LDFLAGS += -fopenmp

# Debian packages the build and the tests need; `make deps` installs whichever are missing, and
# nodejs + npm when node or npm is missing (the tokenizer conformance tests run the JavaScript
# reference; without node they are reported as skipped).
DEB_PACKAGES = build-essential pkg-config libopenblas-dev libdnnl-dev libjansson-dev libpcre2-dev libmicrohttpd-dev bible-kjv curl \
               openmpi-bin libopenmpi-dev

# MPI (src/dist/comm.c, the only file that includes mpi.h) when OpenMPI's compiler wrapper is
# installed, else a one-process build; MPI=0 forces the latter. $(BUILD)/mpi.flags records the
# choice so that comm.o is rebuilt when it changes.
MPI ?= $(shell command -v mpicc >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(MPI),1)
MPI_CFLAGS := -DDSV3_MPI $(shell mpicc --showme:compile)
LDLIBS     += $(shell mpicc --showme:link)
endif

LIB_SRC   := $(shell find src -name '*.c' ! -path 'src/cli/*' | sort)
CLI_SRC   := $(sort $(wildcard src/cli/*.c))
TEST_SRC  := $(sort $(wildcard tests/*.c))
BENCH_SRC := $(sort $(wildcard bench/*.c))

LIB_OBJ   := $(LIB_SRC:%.c=$(BUILD)/%.o)
CLI_OBJ   := $(CLI_SRC:%.c=$(BUILD)/%.o)
TEST_OBJ  := $(TEST_SRC:%.c=$(BUILD)/%.o)
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)

.PHONY: FORCE all deps deps-fuzz test test-fast test-asan bench demo fuzz clean
all: $(BUILD)/dsv3

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done; \
	  { command -v node && command -v npm; } >/dev/null 2>&1 || echo nodejs npm); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/mpi.flags: FORCE
	@mkdir -p $(dir $@)
	@echo '$(MPI_CFLAGS)' | cmp -s - $@ || echo '$(MPI_CFLAGS)' > $@

$(BUILD)/src/dist/comm.o: src/dist/comm.c $(BUILD)/mpi.flags
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(MPI_CFLAGS) -c $< -o $@

$(BUILD)/libdsv3.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/dsv3: $(CLI_OBJ) $(BUILD)/libdsv3.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/test_runner: $(TEST_OBJ) $(BUILD)/libdsv3.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(BUILD)/libdsv3.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# The fast suite, then the same suite built with sanitizers.
test: deps
	$(MAKE) test-fast
	$(MAKE) test-asan
	@echo "all test suites passed"

test-fast: $(BUILD)/dsv3 $(BUILD)/test_runner
	DSV3=$(BUILD)/dsv3 TEST_TMP=$(BUILD)/test-tmp $(BUILD)/test_runner

test-asan:
	$(MAKE) BUILD=build-asan OPT="-O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
	  LDFLAGS="-fopenmp -fsanitize=address,undefined" build-asan/dsv3 build-asan/test_runner
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 DSV3=build-asan/dsv3 TEST_TMP=build-asan/test-tmp \
	  DSV3_TEST_SANITIZED=1 build-asan/test_runner

BENCH_SH := $(sort $(wildcard bench/*.sh))
bench: deps $(BUILD)/dsv3 $(BENCH_BIN)
	@for b in $(BENCH_BIN); do echo "== $$b"; $$b || exit 1; done
	@for s in $(BENCH_SH); do echo "== $$s"; DSV3=$(BUILD)/dsv3 bash $$s || exit 1; done

demo: deps $(BUILD)/dsv3
	DSV3=$(BUILD)/dsv3 bash scripts/demo.sh

# Fuzz targets of the parsers (tests/fuzz/fuzz_*.c, clang's libFuzzer with ASan + UBSan), each run
# for FUZZ_SECONDS from a seed corpus of the test data; a crash stops with the input saved.
FUZZ_SECONDS ?= 30
FUZZ_SRC := $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZ_BIN := $(FUZZ_SRC:tests/fuzz/%.c=build-fuzz/fuzz/%)
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined

deps-fuzz: deps
	@command -v clang >/dev/null 2>&1 && dpkg -s libomp-dev >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq clang libomp-dev; }

build-fuzz/fuzz/%: tests/fuzz/%.c tests/fuzz/fuzz_common.h build-fuzz/libdsv3.a
	@mkdir -p $(dir $@)
	clang -O1 -g -std=gnu11 -Isrc -fopenmp -fsanitize=fuzzer $(FUZZ_SAN) -o $@ $< build-fuzz/libdsv3.a $(LDLIBS)

fuzz: deps-fuzz $(BUILD)/dsv3
	$(MAKE) BUILD=build-fuzz CC=clang OPT="-O1 -fsanitize=fuzzer-no-link $(FUZZ_SAN)" build-fuzz/libdsv3.a
	$(MAKE) $(FUZZ_BIN)
	@set -e; c=build-fuzz/corpus; rm -rf $$c; for t in $(notdir $(FUZZ_BIN)); do mkdir -p $$c/$$t; done; \
	  cp tests/fuzz/seeds/request/* $$c/fuzz_request/; cp tests/fuzz/seeds/batch/* $$c/fuzz_batch/; \
	  cp tests/fuzz/seeds/request/*.json tests/fuzz/seeds/json_prefix/* $$c/fuzz_json_prefix/; \
	  cp tests/fuzz/seeds/json_schema/* $$c/fuzz_json_schema/; cp tests/fuzz/seeds/pattern/* $$c/fuzz_pattern/; \
	  cp tests/fuzz/seeds/tool_calls/* $$c/fuzz_tool_calls/; \
	  printf 'a shard of text for the seed\n' > $$c/doc.txt; \
	  $(BUILD)/dsv3 prepare --tokenizer bytes --out $$c/data --val-fraction 0 $$c/doc.txt >/dev/null; cp $$c/data/train-*.bin $$c/fuzz_shard/; \
	  for d in v3 fp8 v2lite; do cp tests/data/$$d/model.safetensors $$c/fuzz_safetensors/$$d.safetensors; done; \
	  i=0; for f in tests/data/*/config.json bench/configs/*.json; do i=$$((i+1)); cp $$f $$c/fuzz_config/$$i.json; \
	    cp $$f $$c/fuzz_plan/$$i.json; done; \
	  $(BUILD)/dsv3 tokenizer train --vocab-size 400 --out $$c/tokenizer.json README.md docs/*.md >/dev/null; \
	  cp $$c/tokenizer.json $$c/fuzz_tokenizer/; cp README.md docs/tokenizer.md $$c/fuzz_encode/; \
	  for t in $(notdir $(FUZZ_BIN)); do echo "== $$t ($(FUZZ_SECONDS) s)"; \
	    if ! DSV3_FUZZ_TOKENIZER=$$c/tokenizer.json ASAN_OPTIONS=detect_leaks=0 build-fuzz/fuzz/$$t $$c/$$t \
	      -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -artifact_prefix=build-fuzz/$$t- -print_final_stats=1 \
	      > build-fuzz/$$t.log 2>&1; then tail -40 build-fuzz/$$t.log; exit 1; fi; \
	    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" build-fuzz/$$t.log; done; \
	  echo "fuzz: no crash in $(FUZZ_SECONDS) s per target"

clean:
	rm -rf build build-asan build-fuzz

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(TEST_OBJ:.o=.d)
