// LogFMT-10: the low-latency combine's optional 10-bit logarithmic row format.
//
// The specification, with its error bound and the reasons for every step, is
// epcomm.reference.logfmt; this header computes exactly the same float32 operations (each
// rounded once: no fused multiply-add, no approximate instruction), so a kernel's result equals
// the reference's bit for bit.  In short, per 128 channels of a bf16 row with magnitude bits m:
// A = max m, amin = min m; the group is cast iff 2^-88 <= A < 1 and amin < A, else it travels
// as bf16.  L(m) = float(e - 127) + T[f] (T: the float32 nearest log2(1 + f/128)); lx = L(A),
// la = max(L(amin), lx - 32), s = (lx - la) / 510, inv = 1 / s, c = 2 - (0.5 + s * ln2/8);
// a value's word is sign << 9 | clamp(floor((L(m) - la) * inv + c), 0, 511); code k >= 1
// decodes to E(la + (k - 1) * s), E(y) = 2^floor(y) * P(y - floor(y)), P a degree-4 polynomial.
//
// On the wire (ll_combine_send_logfmt): a lane holds 32 consecutive channels, 4 lanes a group;
// a cast lane's 32 words are packed into 10 u32 (word j at bits [10 j, 10 j + 10) of the
// little-endian stream), 40 bytes, so a cast group is 160 bytes instead of 256.
#pragma once
#include "epcomm_common.cuh"

namespace epcomm {

constexpr int kLogfmtGroup = 128;
constexpr int kLogfmtMaxCode = 511;
constexpr u32 kLogfmtAmaxLimit = 0x3F80u;     // bf16 1.0: groups with A >= 1 stay bf16
constexpr u32 kLogfmtAmaxFloor = 39u << 7;    // bf16 2^-88: so do smaller ones (E's result stays normal)
constexpr int kLogfmtCastBytes = kLogfmtGroup * 10 / 8;  // 160
constexpr int kLogfmtRawBytes = kLogfmtGroup * 2;        // 256

// P(r) ~ 2^r on [0, 1) (epcomm.reference.logfmt.EXP2_POLY), and float32(ln 2 / 8).
constexpr float kLogfmtC1 = 0x1.62d6c6p-1f;
constexpr float kLogfmtC2 = 0x1.ee2452p-3f;
constexpr float kLogfmtC3 = 0x1.abf85ap-5f;
constexpr float kLogfmtC4 = 0x1.b7f754p-7f;
constexpr float kLogfmtLn2Div8 = 0x1.62e43p-4f;

// Bits of the float32 nearest log2(1 + f/128), f = 0..127 (epcomm.reference.logfmt.LOG2_TABLE;
// tests/cpu compares them).  Kernels copy them into shared memory (logfmt_load_table): lanes
// index it with different f, which the constant cache would serialise.
__constant__ u32 kLogfmtLog2Bits[128] = {
    0x00000000u, 0x3c37f286u, 0x3cb73cb4u, 0x3d08e68fu, 0x3d35d69cu, 0x3d626fd6u, 0x3d8759c5u, 0x3d9d517fu,
    0x3db31fb8u, 0x3dc8c50bu, 0x3dde4212u, 0x3df39761u, 0x3e0462c4u, 0x3e0ee68du, 0x3e19574fu, 0x3e23b550u,
    0x3e2e00d2u, 0x3e383a17u, 0x3e42615fu, 0x3e4c76e8u, 0x3e567af1u, 0x3e606db6u, 0x3e6a4f72u, 0x3e74205fu,
    0x3e7de0b6u, 0x3e83c857u, 0x3e88983fu, 0x3e8d602eu, 0x3e92203du, 0x3e96d888u, 0x3e9b8926u, 0x3ea03232u,
    0x3ea4d3c2u, 0x3ea96df0u, 0x3eae00d2u, 0x3eb28c7fu, 0x3eb7110eu, 0x3ebb8e96u, 0x3ec0052bu, 0x3ec474e4u,
    0x3ec8ddd4u, 0x3ecd4012u, 0x3ed19bb0u, 0x3ed5f0c4u, 0x3eda3f60u, 0x3ede8797u, 0x3ee2c97du, 0x3ee70525u,
    0x3eeb3a9fu, 0x3eef69ffu, 0x3ef39355u, 0x3ef7b6b4u, 0x3efbd42bu, 0x3effebcdu, 0x3f01fed4u, 0x3f0404e8u,
    0x3f060828u, 0x3f08089eu, 0x3f0a0650u, 0x3f0c0146u, 0x3f0df989u, 0x3f0fef1fu, 0x3f11e20fu, 0x3f13d260u,
    0x3f15c01au, 0x3f17ab44u, 0x3f1993e3u, 0x3f1b7a00u, 0x3f1d5da0u, 0x3f1f3ecau, 0x3f211d84u, 0x3f22f9d5u,
    0x3f24d3c2u, 0x3f26ab53u, 0x3f28808cu, 0x3f2a5374u, 0x3f2c2411u, 0x3f2df268u, 0x3f2fbe80u, 0x3f31885cu,
    0x3f335004u, 0x3f35157du, 0x3f36d8cbu, 0x3f3899f5u, 0x3f3a58ffu, 0x3f3c15eeu, 0x3f3dd0c8u, 0x3f3f8991u,
    0x3f41404fu, 0x3f42f506u, 0x3f44a7bau, 0x3f465872u, 0x3f480731u, 0x3f49b3fbu, 0x3f4b5ed7u, 0x3f4d07c7u,
    0x3f4eaed0u, 0x3f5053f7u, 0x3f51f740u, 0x3f5398afu, 0x3f553848u, 0x3f56d60fu, 0x3f587209u, 0x3f5a0c3au,
    0x3f5ba4a4u, 0x3f5d3b4eu, 0x3f5ed039u, 0x3f60636au, 0x3f61f4e5u, 0x3f6384adu, 0x3f6512c7u, 0x3f669f35u,
    0x3f6829fbu, 0x3f69b31eu, 0x3f6b3a9fu, 0x3f6cc083u, 0x3f6e44cdu, 0x3f6fc781u, 0x3f7148a1u, 0x3f72c832u,
    0x3f744636u, 0x3f75c2b0u, 0x3f773da4u, 0x3f78b714u, 0x3f7a2f04u, 0x3f7ba578u, 0x3f7d1a71u, 0x3f7e8df2u
};

// Block-wide: the table into shared memory `tab` (128 floats); a __syncthreads follows.
EPCOMM_DEVICE void logfmt_load_table(float* tab) {
  for (int i = threadIdx.x; i < 128; i += blockDim.x) tab[i] = __uint_as_float(kLogfmtLog2Bits[i]);
  __syncthreads();
}

// L(m) for bf16 magnitude bits m: float(e - 127) + T[f], one rounding.  For e = 0 (zero and
// subnormals) it is below -126, which encodes as code 0 (la >= -120 in a cast group).
EPCOMM_DEVICE float logfmt_log2(const float* tab, u32 m) {
  return __fadd_rn(__int2float_rn(static_cast<int>(m >> 7) - 127), tab[m & 127u]);
}

struct LogfmtGroup {
  bool cast;
  float la, s, inv, c;
};

EPCOMM_DEVICE LogfmtGroup logfmt_group(const float* tab, u32 amax, u32 amin) {
  LogfmtGroup g;
  const float lx = logfmt_log2(tab, amax);
  g.la = fmaxf(logfmt_log2(tab, amin), __fsub_rn(lx, 32.0f));
  g.cast = amax < kLogfmtAmaxLimit && amax >= kLogfmtAmaxFloor && g.la < lx;
  g.s = __fdiv_rn(__fsub_rn(lx, g.la), static_cast<float>(kLogfmtMaxCode - 1));
  g.inv = __fdiv_rn(1.0f, g.s);
  g.c = __fsub_rn(2.0f, __fadd_rn(0.5f, __fmul_rn(g.s, kLogfmtLn2Div8)));
  return g;
}

// The 10-bit word of one bf16 value `h` of a cast group.
EPCOMM_DEVICE u32 logfmt_word(const float* tab, const LogfmtGroup& g, u32 h) {
  const float d = __fsub_rn(logfmt_log2(tab, h & 0x7FFFu), g.la);
  const float t = __fadd_rn(__fmul_rn(d, g.inv), g.c);
  const int code = min(max(__float2int_rd(t), 0), kLogfmtMaxCode);
  return ((h >> 15) << 9) | static_cast<u32>(code);
}

// E(y) for y >= -121: P(r) in [1, 2) times 2^n, n added to its exponent bits (exact: the
// result is a normal float).
EPCOMM_DEVICE float logfmt_exp2(float y) {
  const float n = floorf(y);
  const float r = __fsub_rn(y, n);
  float p = kLogfmtC4;
  p = __fadd_rn(__fmul_rn(p, r), kLogfmtC3);
  p = __fadd_rn(__fmul_rn(p, r), kLogfmtC2);
  p = __fadd_rn(__fmul_rn(p, r), kLogfmtC1);
  p = __fadd_rn(__fmul_rn(p, r), 1.0f);
  return __int_as_float(__float_as_int(p) + static_cast<int>(n) * (1 << 23));
}

// The value of a 10-bit word of a cast group (code 0: zero, with the word's sign).
EPCOMM_DEVICE float logfmt_value(const LogfmtGroup& g, u32 w) {
  const u32 code = w & 511u;
  const float y = __fadd_rn(g.la, __fmul_rn(__int2float_rn(static_cast<int>(code) - 1), g.s));
  const float mag = code != 0 ? logfmt_exp2(y) : 0.0f;
  return (w >> 9) & 1u ? -mag : mag;
}

// 32 10-bit words into 10 u32 (word j at bits [10 j, 10 j + 10)), and word j back.
EPCOMM_DEVICE void logfmt_pack32(const u32 (&v)[32], u32 (&out)[10]) {
#pragma unroll
  for (int i = 0; i < 10; ++i) out[i] = 0;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int bit = 10 * j, w = bit >> 5, sh = bit & 31;
    out[w] |= v[j] << sh;
    if (sh > 22) out[w + 1] |= v[j] >> (32 - sh);
  }
}

template <int kN>  // in[0..9] hold the packed words (kN >= 10); j: a constant once unrolled
EPCOMM_DEVICE u32 logfmt_unpack(const u32 (&in)[kN], int j) {
  const int bit = 10 * j, w = bit >> 5, sh = bit & 31;
  u32 v = in[w] >> sh;
  if (sh > 22) v |= in[w + 1] << (32 - sh);
  return v & 0x3FFu;
}

}  // namespace epcomm
