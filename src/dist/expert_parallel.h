// Expert parallelism (the V3 report's EP, SPEC §5): the routed experts of every MoE layer, MTP
// modules' included, split over the E ranks of a group — rank r holds experts r·N_r/E ..
// (r+1)·N_r/E − 1 — and each MoE layer's routed part run as
//
//   dispatch:  every token's normalised input goes ONCE to each rank holding at least one of its
//              chosen experts (not once per expert), with the chosen experts there and their gates;
//   experts:   each rank runs its experts over the tokens of every rank that chose them, one
//              product per expert, and adds up a token's gated outputs of the experts it holds;
//   combine:   one row per (token, rank) comes back and the token's rank adds them up in rank order.
//
// The backward pass is the same exchange the other way: the output gradient of a token is
// dispatched like its input, each rank computes its experts' weight gradients and, per (token,
// rank), the input gradient and the gates' gradients, which are combined back. Counts go first (an
// all-to-all of one int per rank), then the payload (one all-to-all of packed rows). It implements
// the model's MoeParallel seam (model/layer.h); a LayerPass pointing at it runs its MoE layers so.
#ifndef DSV3_DIST_EXPERT_PARALLEL_H
#define DSV3_DIST_EXPERT_PARALLEL_H

#include "base/error.h"
#include "dist/dist.h"
#include "model/config.h"
#include "model/layer.h"

typedef struct ExpertParallel ExpertParallel;

// The payloads' format (--a2a-dtype): fp32 exact; bf16 both ways; fp8 as DeepSeek does, the
// dispatched inputs in E4M3 with one scale per 1 × 128 tile (max(amax, 1e-4)/448) and everything
// else — the combined outputs and, in the backward pass, the gradients both ways — in BF16;
// logfmt8 / logfmt10 the same with the dispatched inputs in LogFMT-8 / -10 (kernels/logfmt.h).
typedef enum { A2A_FP32, A2A_BF16, A2A_FP8, A2A_LOGFMT8, A2A_LOGFMT10 } A2aDtype;
// The format named s ("fp32", "bf16", "fp8", "logfmt8", "logfmt10"); -1 for another name.
int a2a_dtype_parse(const char *s, A2aDtype *t);
// The bytes one (token, destination rank) pair puts on the wire in one MoE layer with hidden size d
// and K experts per token: the dispatched row (d values in t, K choices, K gates) and the combined
// one (d values in BF16, or fp32 when t is); backward adds the gradients' two rows (d values and,
// coming back, K gate gradients).
size_t expert_parallel_pair_bytes(int d, int K, A2aDtype t, int backward);
// A row of d values on the wire in format t: its bytes, and the row to and from them.
size_t a2a_row_bytes(int d, A2aDtype t);
void a2a_encode_row(char *dst, const float *x, int d, A2aDtype t);
void a2a_decode_row(float *x, const char *src, int d, A2aDtype t);

// What crossed the wire since the last expert_parallel_take_stats, per rank.
typedef struct ExpertParallelStats {
    double dispatch_bytes, combine_bytes;  // sent by this rank, forward and backward
    long long tokens;                      // tokens this rank routed (forward passes)
    long long token_ranks;                 // (token, destination rank) pairs: how many rows dispatch sent
    long long token_nodes;                 // (token, node) pairs: the nodes each token's experts lie on
    int max_nodes;                         // the most nodes one token's experts lay on
    double intra_node_bytes, inter_node_bytes;  // what left this rank for its own node and for others
    double exchange_s;                     // the all-to-alls' time from start to completion
    double wait_s;                         // of which this rank spent blocked waiting (not hidden)
} ExpertParallelStats;

// An expert-parallel MoE over the ranks of comm (E = its size) for a model of configuration c
// (n_routed_experts divisible by E). Keeps per MoE layer what its backward pass reads.
ExpertParallel *expert_parallel_new(DistComm *comm, const ModelConfig *c, A2aDtype dtype, Error *err);
void expert_parallel_free(ExpertParallel *ep);
// The seam a LayerPass takes (LayerPass.moe_parallel): every rank its own tokens, exchanged as above.
MoeParallel *expert_parallel_seam(ExpertParallel *ep);
// The seam for ranks that all run the same tokens (inference: `dsv3 logits` under mpirun, where
// every rank runs the dense layers over the whole prompt): nothing is dispatched; each rank runs
// its experts over the tokens that chose them and the ranks' partial sums are added up in rank
// order (a deterministic all-reduce of N × d), so every rank continues with the same rows.
// Forward only.
MoeParallel *expert_parallel_seam_replicated(ExpertParallel *ep);
// Groups the ranks into nodes of ranks_per_node consecutive ranks (default: all on one node), for
// the traffic counts; with the experts of each of the config's n_group groups on one node (n_group
// a multiple of the nodes), group-limited routing reaches at most topk_group nodes per token — the
// report's node-limited routing. -1 when ranks_per_node does not divide the group's size.
int expert_parallel_set_nodes(ExpertParallel *ep, int ranks_per_node, Error *err);
// Overlap (on by default for the all-to-all seam): a MoE layer's tokens go in two chunks, both
// dispatched at once, and each chunk's experts run while the other chunk's exchange is in flight
// (MPI moved on by progress calls between the experts' products) — the report's two micro-batches
// in flight, within a layer. Off: one chunk, each exchange waited for at once.
void expert_parallel_set_overlap(ExpertParallel *ep, int on);
// Whether this rank holds routed expert e.
int expert_parallel_holds(const ExpertParallel *ep, int e);
// The bytes of the weights w of configuration c (stored types, FP8 scales included) that this rank
// reads — every tensor but the routed experts other ranks hold — and of all of them.
void expert_parallel_weight_bytes(const ExpertParallel *ep, const ModelConfig *c, ModelWeights *w, long long *used,
                                  long long *all);
// Returns the figures gathered since the last call and starts counting again.
ExpertParallelStats expert_parallel_take_stats(ExpertParallel *ep);

#endif
