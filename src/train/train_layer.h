// One decoder layer of the training model (MLA, then a dense SwiGLU FFN or DeepSeekMoE), forward
// and backward; used by train_model.c for the main layers and the MTP modules' layers.
#ifndef DSV3_TRAIN_TRAIN_LAYER_H
#define DSV3_TRAIN_TRAIN_LAYER_H

#include "train/train_model.h"

// x_out = x_in + MLA(RMSNorm(x_in)), then x_out += FFN(RMSNorm(x_out)), over a->N rows (a->B
// sequences of a->T positions). load: (N_r) tokens per expert, written for a MoE layer.
// Returns the layer's balance loss (0 for a dense layer or α = 0).
double train_layer_forward(TrainModel *m, const TrainLayer *w, TrainLayerActs *a, long long *load);
// dres (N, d): the gradient of x_out on entry, of x_in on return. g: the layer's gradients.
void train_layer_backward(TrainModel *m, const TrainLayer *w, TrainLayer *g, TrainLayerActs *a, float *dres,
                          float balance_dloss);

#endif
