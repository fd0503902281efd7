// Weight-only quantized linear layers for small batches on CPU: y = x W^T with W stored as int8 (one scale per
// output row) or packed int4 (one scale per group of input features), in the layouts of omnilm.infer.quantize.
//
// Why hand-written: decoding a batch of a few tokens is bound by reading the weights. PyTorch's CPU paths either
// dequantise the whole matrix to float first (reading and writing 4 bytes per weight again) or run weight-only
// kernels that are slower than fp32 on x86. Here each weight byte is read once, widened to float in registers and
// multiplied into every row of x while it is there; rows of W are split over threads.
//
// Numerics of int8_linear / int4_linear: activations stay float32 (the *_q8 kernels below quantize them). For int8, a row's dot product is accumulated
// over the integer codes and multiplied by the row scale once; for int4, each group's partial sum is multiplied by
// its scale. The reference (dequantise, then matmul) rounds q*s first: results agree to float32 rounding
// (relative 1e-5), not bit for bit, because the summation order differs.
//
// Code paths: AVX-512F, AVX2+FMA, and portable C++ (chosen at compile time from the build machine's -march).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// ----------------------------------------------------------------------------------------------------------------
// Vector traits: W float lanes, widening loads of W int8 codes / W packed bytes (2W int4 codes), FMA, reduction.

#if defined(__AVX512F__)
struct Vec {
  using F = __m512;
  static constexpr int W = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(F a) { return _mm512_reduce_add_ps(a); }
  static F i8(const int8_t* p) {  // W signed bytes -> W floats
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void nibbles(const uint8_t* p, F& low, F& high) {  // W bytes -> W low and W high nibbles
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    low = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
    high = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }
};
#define OMNILM_HAVE_VEC 1
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using F = __m256;
  static constexpr int W = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
  }
  static F i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void nibbles(const uint8_t* p, F& low, F& high) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    low = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0x0F)));
    high = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
};
#define OMNILM_HAVE_VEC 1
#endif

// Rows of x handled together: each widened weight vector is used NB times while in registers.
constexpr int64_t MAX_TILE = 4;

// ----------------------------------------------------------------------------------------------------------------
// int8: y[b, o] = scale[o] * sum_i x[b, i] * q[o, i]

template <int NB>
void int8_rows(const float* x, int64_t in, const int8_t* q, const float* scales, float* y, int64_t out,
               int64_t o_begin, int64_t o_end) {
  for (int64_t o = o_begin; o < o_end; ++o) {
    const int8_t* row = q + o * in;
    float total[NB];
    int64_t i = 0;
#ifdef OMNILM_HAVE_VEC
    // Two accumulators per x row hide the FMA latency when NB is small.
    typename Vec::F acc0[NB], acc1[NB];
    for (int b = 0; b < NB; ++b) acc0[b] = acc1[b] = Vec::zero();
    for (; i + 2 * Vec::W <= in; i += 2 * Vec::W) {
      typename Vec::F w0 = Vec::i8(row + i), w1 = Vec::i8(row + i + Vec::W);
      for (int b = 0; b < NB; ++b) {
        acc0[b] = Vec::fma(w0, Vec::load(x + b * in + i), acc0[b]);
        acc1[b] = Vec::fma(w1, Vec::load(x + b * in + i + Vec::W), acc1[b]);
      }
    }
    for (int b = 0; b < NB; ++b) total[b] = Vec::sum(acc0[b]) + Vec::sum(acc1[b]);
#else
    for (int b = 0; b < NB; ++b) total[b] = 0.0f;
#endif
    for (; i < in; ++i)
      for (int b = 0; b < NB; ++b) total[b] += x[b * in + i] * static_cast<float>(row[i]);
    for (int b = 0; b < NB; ++b) y[b * out + o] = total[b] * scales[o];
  }
}

// ----------------------------------------------------------------------------------------------------------------
// int4: byte j of a row holds input features 2j (low nibble) and 2j+1 (high nibble), codes stored offset by 8.
// With x split into its even features xe and odd features xo (done once per call, see int4_linear),
//   y[b, o] = sum_g scale[o, g] * (sum_{j in g} xe[b, j] * low[o, j] + xo[b, j] * high[o, j] - 8 * xsum[b, g]).

template <int NB>
void int4_rows(const float* xe, const float* xo, const float* xsum, int64_t half, int64_t groups,
               const uint8_t* q, const float* scales, float* y, int64_t out, int64_t o_begin, int64_t o_end) {
  const int64_t group_bytes = half / groups;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* row = q + o * half;
    const float* row_scales = scales + o * groups;
    float total[NB], offset[NB];
    for (int b = 0; b < NB; ++b) total[b] = offset[b] = 0.0f;
#ifdef OMNILM_HAVE_VEC
    const bool vector_groups = group_bytes % Vec::W == 0;
    typename Vec::F scaled[NB];
    for (int b = 0; b < NB; ++b) scaled[b] = Vec::zero();
#endif
    for (int64_t g = 0; g < groups; ++g) {
      const float s = row_scales[g];
      const int64_t begin = g * group_bytes, end = begin + group_bytes;
      for (int b = 0; b < NB; ++b) offset[b] += s * xsum[b * groups + g];
#ifdef OMNILM_HAVE_VEC
      if (vector_groups) {
        typename Vec::F acc[NB];
        for (int b = 0; b < NB; ++b) acc[b] = Vec::zero();
        for (int64_t j = begin; j < end; j += Vec::W) {
          typename Vec::F low, high;
          Vec::nibbles(row + j, low, high);
          for (int b = 0; b < NB; ++b) {
            acc[b] = Vec::fma(low, Vec::load(xe + b * half + j), acc[b]);
            acc[b] = Vec::fma(high, Vec::load(xo + b * half + j), acc[b]);
          }
        }
        const typename Vec::F sv = Vec::set1(s);
        for (int b = 0; b < NB; ++b) scaled[b] = Vec::fma(acc[b], sv, scaled[b]);
        continue;
      }
#endif
      for (int b = 0; b < NB; ++b) {
        float acc = 0.0f;
        for (int64_t j = begin; j < end; ++j)
          acc += xe[b * half + j] * static_cast<float>(row[j] & 0x0F) +
                 xo[b * half + j] * static_cast<float>(row[j] >> 4);
        total[b] += s * acc;
      }
    }
#ifdef OMNILM_HAVE_VEC
    for (int b = 0; b < NB; ++b) total[b] += Vec::sum(scaled[b]);
#endif
    for (int b = 0; b < NB; ++b) y[b * out + o] = total[b] - 8.0f * offset[b];
  }
}

// Bytes of W below which one thread does a whole chunk: waking the others costs more than it saves.
constexpr int64_t MIN_CHUNK_BYTES = 64 * 1024;

// Calls kernel<NB>(tile of up to MAX_TILE rows) for every tile of x's rows, over threads splitting W's rows
// (each ``row_bytes`` long).
template <typename Kernel>
void for_tiles(int64_t rows, int64_t out, int64_t row_bytes, Kernel kernel) {
  // Small grains give both threads work on narrow layers; each grain is one pass over grain rows of W.
  const int64_t grain = std::max({int64_t{1}, std::min<int64_t>(64, out / (4 * at::get_num_threads())),
                                  MIN_CHUNK_BYTES / std::max<int64_t>(row_bytes, 1)});
  at::parallel_for(0, out, grain, [&](int64_t o_begin, int64_t o_end) {
    for (int64_t r = 0; r < rows; r += MAX_TILE) {
      switch (std::min<int64_t>(MAX_TILE, rows - r)) {
        case 1: kernel(std::integral_constant<int, 1>{}, r, o_begin, o_end); break;
        case 2: kernel(std::integral_constant<int, 2>{}, r, o_begin, o_end); break;
        case 3: kernel(std::integral_constant<int, 3>{}, r, o_begin, o_end); break;
        default: kernel(std::integral_constant<int, 4>{}, r, o_begin, o_end); break;
      }
    }
  });
}

void check_input(const torch::Tensor& x, int64_t in) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "x must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, "x must be (rows, ", in, "), got ", x.sizes());
}

// Checks packed int4 weights (out, in/2), their scales (out, groups) and x (rows, in), and makes all three
// contiguous; returns (out, in/2, groups).
std::tuple<int64_t, int64_t, int64_t> check_int4(torch::Tensor& x, torch::Tensor& qweight, torch::Tensor& scales) {
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.dim() == 2, "qweight must be uint8 (out, in/2)");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.dim() == 2 && scales.size(0) == qweight.size(0),
              "scales must be float32 (out, groups)");
  const int64_t out = qweight.size(0), half = qweight.size(1), groups = scales.size(1);
  TORCH_CHECK(half % groups == 0, "groups must divide the packed row");
  check_input(x, 2 * half);
  qweight = qweight.contiguous();
  scales = scales.contiguous();
  x = x.contiguous();
  return {qweight.size(0), qweight.size(1), scales.size(1)};
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales) {
  TORCH_CHECK(qweight.scalar_type() == torch::kInt8 && qweight.dim() == 2, "qweight must be int8 (out, in)");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.numel() == qweight.size(0), "scales: (out,) f32");
  const int64_t out = qweight.size(0), in = qweight.size(1);
  check_input(x, in);
  x = x.contiguous();
  qweight = qweight.contiguous();
  scales = scales.contiguous();
  const int64_t rows = x.size(0);
  auto y = torch::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_tiles(rows, out, in, [&](auto nb, int64_t r, int64_t o_begin, int64_t o_end) {
    int8_rows<decltype(nb)::value>(xp + r * in, in, qp, sp, yp + r * out, out, o_begin, o_end);
  });
  return y;
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales) {
  const auto [out, half, groups] = check_int4(x, qweight, scales);
  const int64_t rows = x.size(0);
  // Even and odd input features apart (they meet a byte's low and high nibbles), and each group's sum of x.
  auto pairs = x.view({rows, half, 2});
  auto xe = pairs.select(2, 0).contiguous(), xo = pairs.select(2, 1).contiguous();
  auto xsum = x.view({rows, groups, 2 * half / groups}).sum(2).contiguous();
  auto y = torch::empty({rows, out}, x.options());
  const float *ep = xe.data_ptr<float>(), *op = xo.data_ptr<float>(), *gp = xsum.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_tiles(rows, out, half, [&](auto nb, int64_t r, int64_t o_begin, int64_t o_end) {
    int4_rows<decltype(nb)::value>(ep + r * half, op + r * half, gp + r * groups, half, groups, qp, sp,
                                   yp + r * out, out, o_begin, o_end);
  });
  return y;
}

// ----------------------------------------------------------------------------------------------------------------
// int4 weights × int8 activations (as llama.cpp's q4 × q8 dot products): each group of x is quantized symmetrically
// to int8 with its own scale sx (absmax / 127), then
//   y[b, o] = sum_g scale[o, g] * sx[b, g] * (sum_{j in g} low[o, j] * xe[b, j] + high[o, j] * xo[b, j] - 8 * qsum[b, g])
// with integer sums (exact in int32), where xe/xo are the quantized even/odd features. With AVX512-VNNI one
// instruction multiplies 64 nibble-bytes (unsigned) by 64 activation bytes (signed) and adds them in groups of four.

template <int NB>
void int4_q8_rows(const int8_t* xe, const int8_t* xo, const float* sx, const int32_t* qsum, int64_t half,
                  int64_t groups, const uint8_t* q, const float* scales, float* y, int64_t out, int64_t o_begin,
                  int64_t o_end) {
  const int64_t group_bytes = half / groups;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* row = q + o * half;
    const float* row_scales = scales + o * groups;
    float total[NB];
    for (int b = 0; b < NB; ++b) total[b] = 0.0f;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    // Each group's integer lanes are scaled into float lanes; one horizontal sum per row, not one per group.
    __m512 scaled[NB];
    for (int b = 0; b < NB; ++b) scaled[b] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi8(0x0F);
#endif
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t begin = g * group_bytes, end = begin + group_bytes;
      int32_t dot[NB];
      for (int b = 0; b < NB; ++b) dot[b] = 0;
      int64_t j = begin;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      if (j + 64 <= end) {
        // Low and high nibbles accumulate apart: two independent dependency chains instead of one.
        __m512i acc_low[NB], acc_high[NB];
        for (int b = 0; b < NB; ++b) acc_low[b] = acc_high[b] = _mm512_setzero_si512();
        for (; j + 64 <= end; j += 64) {
          const __m512i bytes = _mm512_loadu_si512(row + j);
          const __m512i low = _mm512_and_si512(bytes, mask);
          const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask);
          for (int b = 0; b < NB; ++b) {
            acc_low[b] = _mm512_dpbusd_epi32(acc_low[b], low, _mm512_loadu_si512(xe + b * half + j));
            acc_high[b] = _mm512_dpbusd_epi32(acc_high[b], high, _mm512_loadu_si512(xo + b * half + j));
          }
        }
        for (int b = 0; b < NB; ++b)
          scaled[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc_low[b], acc_high[b])),
                                      _mm512_set1_ps(row_scales[g] * sx[b * groups + g]), scaled[b]);
      }
#endif
      for (; j < end; ++j)
        for (int b = 0; b < NB; ++b)
          dot[b] += static_cast<int32_t>(row[j] & 0x0F) * xe[b * half + j] +
                    static_cast<int32_t>(row[j] >> 4) * xo[b * half + j];
      for (int b = 0; b < NB; ++b)
        total[b] += row_scales[g] * sx[b * groups + g] * static_cast<float>(dot[b] - 8 * qsum[b * groups + g]);
    }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    for (int b = 0; b < NB; ++b) total[b] += _mm512_reduce_add_ps(scaled[b]);
#endif
    for (int b = 0; b < NB; ++b) y[b * out + o] = total[b];
  }
}

torch::Tensor int4_q8_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales) {
  const auto [out, half, groups] = check_int4(x, qweight, scales);
  const int64_t rows = x.size(0), group_size = 2 * half / groups;
  // Quantize x group by group; even and odd features apart (they meet a byte's low and high nibbles).
  auto xe = torch::empty({rows, half}, torch::kInt8), xo = torch::empty({rows, half}, torch::kInt8);
  auto sx = torch::empty({rows, groups}, torch::kFloat32);
  auto qsum = torch::empty({rows, groups}, torch::kInt32);
  const float* xp = x.data_ptr<float>();
  int8_t *ep = xe.data_ptr<int8_t>(), *op = xo.data_ptr<int8_t>();
  float* sp = sx.data_ptr<float>();
  int32_t* qp = qsum.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float* v = xp + r * 2 * half + g * group_size;
      float amax = 0.0f;
      for (int64_t k = 0; k < group_size; ++k) amax = std::max(amax, std::fabs(v[k]));
      const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
      int32_t sum = 0;
      for (int64_t k = 0; k < group_size; ++k) {
        const int32_t code = static_cast<int32_t>(std::nearbyint(v[k] / scale));
        sum += code;
        (k % 2 ? op : ep)[r * half + (g * group_size + k) / 2] = static_cast<int8_t>(code);
      }
      sp[r * groups + g] = scale;
      qp[r * groups + g] = sum;
    }
  auto y = torch::empty({rows, out}, x.options());
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const float* wsp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_tiles(rows, out, half, [&](auto nb, int64_t r, int64_t o_begin, int64_t o_end) {
    int4_q8_rows<decltype(nb)::value>(ep + r * half, op + r * half, sp + r * groups, qp + r * groups, half, groups,
                                      wp, wsp, yp + r * out, out, o_begin, o_end);
  });
  return y;
}

// ----------------------------------------------------------------------------------------------------------------
// int8 weights × int8 activations: x is quantized in blocks of Q8_BLOCK features, each with its own scale sx (absmax
// / 127). VNNI multiplies unsigned by signed bytes, so each weight byte is read as w + 128 (flipping its top bit)
// and the excess 128 * sum(x codes) of a block, which does not depend on the output row, is taken off once:
//   y[b, o] = scale[o] * sum_k sx[b, k] * (sum_{i in k} (q[o, i] + 128) * xq[b, i] - 128 * qsum[b, k])

constexpr int64_t Q8_BLOCK = 64;

template <int NB>
void int8_q8_rows(const int8_t* xq, const float* sx, const float* excess, int64_t in, const int8_t* q,
                  const float* scales, float* y, int64_t out, int64_t o_begin, int64_t o_end) {
  const int64_t blocks = in / Q8_BLOCK;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const int8_t* row = q + o * in;
    float total[NB];
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512 scaled[NB];
    for (int b = 0; b < NB; ++b) scaled[b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < blocks; ++k) {
      const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(row + k * Q8_BLOCK), flip);
      for (int b = 0; b < NB; ++b) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                                _mm512_loadu_si512(xq + b * in + k * Q8_BLOCK));
        scaled[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(sx[b * blocks + k]), scaled[b]);
      }
    }
    for (int b = 0; b < NB; ++b) total[b] = _mm512_reduce_add_ps(scaled[b]);
#else
    for (int b = 0; b < NB; ++b) {
      total[b] = 0.0f;
      for (int64_t k = 0; k < blocks; ++k) {
        int32_t dot = 0;
        for (int64_t i = k * Q8_BLOCK; i < (k + 1) * Q8_BLOCK; ++i)
          dot += (static_cast<int32_t>(row[i]) + 128) * xq[b * in + i];
        total[b] += sx[b * blocks + k] * static_cast<float>(dot);
      }
    }
#endif
    for (int b = 0; b < NB; ++b) y[b * out + o] = scales[o] * (total[b] - excess[b]);
  }
}

torch::Tensor int8_q8_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales) {
  TORCH_CHECK(qweight.scalar_type() == torch::kInt8 && qweight.dim() == 2, "qweight must be int8 (out, in)");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.numel() == qweight.size(0), "scales: (out,) f32");
  const int64_t out = qweight.size(0), in = qweight.size(1);
  check_input(x, in);
  TORCH_CHECK(in % Q8_BLOCK == 0, "int8_q8_linear needs in_features divisible by ", Q8_BLOCK, ", got ", in);
  x = x.contiguous();
  qweight = qweight.contiguous();
  scales = scales.contiguous();
  const int64_t rows = x.size(0), blocks = in / Q8_BLOCK;
  auto xq = torch::empty({rows, in}, torch::kInt8);
  auto sx = torch::empty({rows, blocks}, torch::kFloat32);
  auto excess = torch::empty({rows}, torch::kFloat32);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  float *sp = sx.data_ptr<float>(), *ep = excess.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    float row_excess = 0.0f;
    for (int64_t k = 0; k < blocks; ++k) {
      const float* v = xp + r * in + k * Q8_BLOCK;
      float amax = 0.0f;
      for (int64_t i = 0; i < Q8_BLOCK; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
      int32_t sum = 0;
      for (int64_t i = 0; i < Q8_BLOCK; ++i) {
        const int32_t code = static_cast<int32_t>(std::nearbyint(v[i] / scale));
        qp[r * in + k * Q8_BLOCK + i] = static_cast<int8_t>(code);
        sum += code;
      }
      sp[r * blocks + k] = scale;
      row_excess += scale * static_cast<float>(128 * sum);
    }
    ep[r] = row_excess;
  }
  auto y = torch::empty({rows, out}, x.options());
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* wsp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_tiles(rows, out, in, [&](auto nb, int64_t r, int64_t o_begin, int64_t o_end) {
    int8_q8_rows<decltype(nb)::value>(qp + r * in, sp + r * blocks, ep + r, in, wp, wsp, yp + r * out, out, o_begin,
                                      o_end);
  });
  return y;
}

std::string vector_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

bool integer_dot_products() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "x (rows, in) f32 @ int8 (out, in) * scales (out) -> (rows, out)");
  m.def("int4_linear", &int4_linear, "x (rows, in) f32 @ packed int4 (out, in/2) * scales (out, groups)");
  m.def("int4_q8_linear", &int4_q8_linear, "int4_linear with x quantized to int8 per weight group (integer dots)");
  m.def("int8_q8_linear", &int8_q8_linear, "int8_linear with x quantized to int8 per block of 64 (integer dots)");
  m.def("integer_dot_products", &integer_dot_products, "whether the *_q8 kernels have a vector path (else scalar)");
  m.def("vector_isa", &vector_isa, "the vector instruction set the kernels were compiled for");
}
