# dsv3 — build, test and benchmark.  `make` builds build/dsv3; `make test` runs every test (then
# again under AddressSanitizer + UndefinedBehaviorSanitizer); `make bench` prints the figures.
CC      ?= gcc
BUILD   ?= build
OPT     ?= -O2
CFLAGS  ?= $(OPT) -g
CFLAGS  += -std=gnu11 -Wall -Wextra -fopenmp -Isrc -MMD -MP
LDLIBS  += -lopenblas -ljansson -lpcre2-8 -lm
LDFLAGS += -fopenmp

# Debian packages the build and the tests need; `make deps` installs whichever are missing, and
# nodejs + npm when node or npm is missing (the tokenizer conformance tests run the JavaScript
# reference; without node they are reported as skipped).
DEB_PACKAGES = build-essential pkg-config libopenblas-dev libjansson-dev libpcre2-dev bible-kjv

LIB_SRC   := $(shell find src -name '*.c' ! -path 'src/cli/*' | sort)
CLI_SRC   := $(sort $(wildcard src/cli/*.c))
TEST_SRC  := $(sort $(wildcard tests/*.c))
BENCH_SRC := $(sort $(wildcard bench/*.c))

LIB_OBJ   := $(LIB_SRC:%.c=$(BUILD)/%.o)
CLI_OBJ   := $(CLI_SRC:%.c=$(BUILD)/%.o)
TEST_OBJ  := $(TEST_SRC:%.c=$(BUILD)/%.o)
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)

.PHONY: all deps test test-fast test-asan bench demo clean
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

clean:
	rm -rf build build-asan

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(TEST_OBJ:.o=.d)
