// matmul_amx.c compiled again against a C model of the four tile instructions (the SDM's
// sequence), as gemm_lowp_amx_emulated and matmul_nt_amx_emulated: the tests check the AMX
// kernels' blocking, padding and packing on every CPU with AVX512_BF16, tiles or not.
#define AMX_EMULATE
#include "matmul_amx.c"
