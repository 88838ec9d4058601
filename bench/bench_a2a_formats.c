// The expert-parallel payload formats on the activations of a real training run (the ISCA paper's
// LogFMT comparison, §3.2): the inputs a MoE layer dispatches (the normalised hidden states after
// post_attention_layernorm) of the `make demo` checkpoint on held-out text, sent as BF16, E4M3 with
// 1 × 128 tile scales (DeepSeek's dispatch), LogFMT-8 and LogFMT-10, each decoded and compared with
// the fp32 values: relative RMS error ‖dec − x‖ / ‖x‖, the mean and the 99.9th percentile of the
// element-wise relative error over the non-zero values, and bytes per value on the wire.
//
//   build/bench/bench_a2a_formats [RUN_OR_CHECKPOINT [DATA_DIR]]   (default build/demo/run, build/demo/data)
//
// Prints "skipped" when the checkpoint is missing (`make demo` makes it).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "dist/expert_parallel.h"
#include "model/config.h"
#include "train/data.h"
#include "train/train_model.h"
#include "train/trainer.h"

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    const char *run = argc > 1 ? argv[1] : "build/demo/run", *data = argc > 2 ? argv[2] : "build/demo/data";
    Error err = {0};
    char ckpt[4096], cfg_path[4200];
    if (!path_is_dir(run) || trainer_find_checkpoint(run, ckpt, sizeof ckpt, &err) || !path_is_dir(data)) {
        printf("a2a formats: skipped (no checkpoint in %s or no data in %s; `make demo` makes both)\n", run, data);
        return 0;
    }
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", ckpt);
    ModelConfig c;
    TrainModel m;
    DataLoader val;
    const int B = 4, T = 256, batches = 4;
    if (config_load(&c, cfg_path, &err) || train_model_new(&m, &c, B, T, &err) || train_model_load(&m, ckpt, &err) ||
        loader_open(&val, data, "val", T, 0, 0, c.vocab_size, &err)) {
        fprintf(stderr, "bench_a2a_formats: %s\n", err.msg);
        return 1;
    }
    m.obj.mtp_lambda = 0;
    const A2aDtype types[] = {A2A_BF16, A2A_FP8, A2A_LOGFMT8, A2A_LOGFMT10};
    const char *names[] = {"BF16", "E4M3, 1x128 scales", "LogFMT-8", "LogFMT-10"};
    int d = c.hidden_size, N = B * T;
    double se[4] = {0}, sx = 0, sum_rel[4] = {0};
    long count = 0, cap = (long)batches * N * d * c.num_hidden_layers;
    float *rel[4];
    for (int f = 0; f < 4; f++) rel[f] = malloc(sizeof(float) * cap);
    int *tokens = malloc(sizeof(int) * B * (T + 1));
    float *dec = malloc(sizeof(float) * d);
    char *wire = malloc(4 * (size_t)d + 4096);
    int layers = 0;
    for (int b = 0; b < batches; b++) {
        loader_next_batch(&val, tokens, B);
        if (train_model_evaluate(&m, tokens, &err)) {
            fprintf(stderr, "bench_a2a_formats: %s\n", err.msg);
            return 1;
        }
        for (int l = 0; l < c.num_hidden_layers; l++) {
            if (!m.p.layers[l].is_moe) continue;
            layers += b == 0;
            const float *x = m.a.layers[l].acts.ln2;  // (N, d) what the layer dispatches
            for (int i = 0; i < N; i++) {
                const float *row = x + (size_t)i * d;
                for (int f = 0; f < 4; f++) {
                    a2a_encode_row(wire, row, d, types[f]);
                    a2a_decode_row(dec, wire, d, types[f]);
                    for (int j = 0; j < d; j++) {
                        double e = (double)dec[j] - row[j];
                        se[f] += e * e;
                        if (row[j] != 0) {
                            float r = (float)fabs(e / row[j]);
                            rel[f][count + j] = r;
                            sum_rel[f] += r;
                        } else {
                            rel[f][count + j] = 0;
                        }
                    }
                }
                for (int j = 0; j < d; j++) sx += (double)row[j] * row[j];
                count += d;
            }
        }
    }
    printf("MoE dispatch payloads of %s on %d x %d held-out tokens, %d MoE layers, hidden %d (%ld values):\n", ckpt,
           batches, B * T, layers, d, count);
    printf("%-20s %14s %14s %16s %12s\n", "format", "rel RMS error", "mean rel err", "99.9% rel err", "bytes/value");
    for (int f = 0; f < 4; f++) {
        qsort(rel[f], count, sizeof(float), cmp_float);
        printf("%-20s %14.3g %14.3g %16.3g %12.3f\n", names[f], sqrt(se[f] / sx), sum_rel[f] / count,
               rel[f][(long)(0.999 * (count - 1))], (double)a2a_row_bytes(d, types[f]) / d);
    }
    printf("(fp32: 4 bytes/value; bytes include the scales: E4M3 one fp32 per 128 values, LogFMT two)\n");
    for (int f = 0; f < 4; f++) free(rel[f]);
    free(tokens), free(dec), free(wire);
    loader_close(&val);
    train_model_free(&m);
    return 0;
}
