// The per-element maths of Generalized Focal Loss, in one place.
//
// Every C++ and CUDA kernel of gfl_ops includes this header and calls these functions;
// no kernel writes a formula of its own. The Triton kernels (gfl_ops/triton/) follow the
// same equations under the same names. Derivations: docs/MATH.md.
//
// The header is deliberately light (no torch includes) so that CUDA translation units
// stay quick to compile. `acc_t` is the type the maths runs in: float for float32,
// float16 and bfloat16 inputs, double for float64 inputs.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GFL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GFL_HOST_DEVICE inline __attribute__((always_inline))
#endif

// `#pragma omp simd` for the host compiler (the CPU kernels build with -fopenmp); nothing
// in device code, where one thread runs the loop.
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define GFL_SIMD(...)
#else
#define GFL_PRAGMA(text) _Pragma(#text)
#define GFL_SIMD(...) GFL_PRAGMA(omp simd __VA_ARGS__)
#endif

// The 16-bit float types of the kernels' inputs, declared only (no torch includes): the
// host converts them through their bit patterns (see "Element conversions" below).
namespace c10 {
struct Half;
struct BFloat16;
}  // namespace c10

namespace gfl {
namespace math {

// The type the maths runs in: double for double inputs, float for float, half and bfloat16.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ---------------------------------------------------------------------------------------
// Primitives: exp, log and log1p.
//
// On the host the float versions are branch-free polynomials (Cephes-style range
// reduction) so that the compiler vectorises whole kernel loops with them; libm calls
// would keep the loops scalar. They are accurate to a few ulp and propagate NaN. On the
// device, and for double everywhere, the standard functions are used. GFL_DEVICE_MATH
// selects the device's branch; the CUDA emulator's host build defines
// GFL_HOST_USES_DEVICE_MATH to take it too (expf, log1pf, logf, powf, sqrtf from libm),
// so that the emulated suite checks the formulas a GPU runs.
// ---------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__) || defined(GFL_HOST_USES_DEVICE_MATH)
#define GFL_DEVICE_MATH 1
#else
#define GFL_DEVICE_MATH 0
#endif

GFL_HOST_DEVICE float select(bool condition, float if_true, float if_false) { return condition ? if_true : if_false; }

GFL_HOST_DEVICE float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

GFL_HOST_DEVICE int32_t float_to_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2, exp(r) by a degree-7 polynomial.
GFL_HOST_DEVICE float exp_(float x) {
#if GFL_DEVICE_MATH
  return expf(x);
#else
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Rounding by adding 1.5 * 2^23: the sum's last mantissa bits hold n, so n needs no
  // floor() and no float-to-int conversion (both slow in vector code). |n| <= 127.
  constexpr float kRoundingShift = 12582912.0f;
  constexpr int32_t kRoundingShiftBits = 0x4B400000;  // the bits of kRoundingShift
  const float shifted = clamped * 1.44269504088896341f + kRoundingShift;
  const float n = shifted - kRoundingShift;
  // ln2 split in two so that n * ln2 is subtracted without rounding error.
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  const float r2 = r * r;
  // clang-format off: the polynomial in Horner's form, one coefficient a step
  const float poly =
      (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
         4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r2 + r + 1.0f;
  // clang-format on
  const float two_to_n = bits_to_float((float_to_bits(shifted) - kRoundingShiftBits + 127) << 23);
  float result = poly * two_to_n;
  result = select(x < -87.0f, 0.0f, result);                  // underflow: exactly 0
  result = select(x > 88.0f, __builtin_huge_valf(), result);  // overflow: +inf
  return select(x != x, x, result);                           // NaN stays NaN
#endif
}

// 2 * atanh(s) = log((1 + s) / (1 - s)) = 2 * (s + s^3/3 + s^5/5 + ...), for |s| <= 1/3.
GFL_HOST_DEVICE float two_atanh_series(float s) {
  const float s2 = s * s;
  // clang-format off: the series in Horner's form
  const float tail =
      ((((((1.0f / 15.0f) * s2 + 1.0f / 13.0f) * s2 + 1.0f / 11.0f) * s2 + 1.0f / 9.0f) * s2 +
        1.0f / 7.0f) * s2 + 1.0f / 5.0f) * s2 + 1.0f / 3.0f;
  // clang-format on
  return 2.0f * (s + s * s2 * tail);
}

// log1p(t) for t in [0, 1] (the range of exp(-|x|)): log(1 + t) = 2 atanh(t / (2 + t)),
// exact for tiny t where 1 + t would round.
GFL_HOST_DEVICE float log1p_unit(float t) {
#if GFL_DEVICE_MATH
  return log1pf(t);
#else
  return two_atanh_series(t / (2.0f + t));
#endif
}

// log(x) = e * ln2 + log(m), x = m * 2^e with m in [sqrt(1/2), sqrt(2)).
#if !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
// x = 2^exponent * mantissa with mantissa in [sqrt(1/2), sqrt(2)), for finite x > 0
// (subnormals included); log(mantissa) = 2 atanh((mantissa - 1) / (mantissa + 1)).
struct LogParts {
  float exponent;
  float log_mantissa;
};

GFL_HOST_DEVICE LogParts log_parts(float x) {
  const bool subnormal = x < 1.17549435e-38f;
  const float scaled = select(subnormal, x * 8388608.0f, x);  // 2^23 lifts subnormals
  const int32_t bits = float_to_bits(scaled);
  int32_t exponent = ((bits >> 23) & 0xff) - 127;
  float mantissa = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // in [1, 2)
  const bool above_sqrt2 = mantissa > 1.41421356f;
  mantissa = select(above_sqrt2, mantissa * 0.5f, mantissa);
  exponent = above_sqrt2 ? exponent + 1 : exponent;
  return {static_cast<float>(exponent) - select(subnormal, 23.0f, 0.0f),
          two_atanh_series((mantissa - 1.0f) / (mantissa + 1.0f))};
}

// ln2 = kLn2High + kLn2Low; kLn2High has 9 significant bits, so exponent * kLn2High is exact.
constexpr float kLn2High = 0.693359375f;
constexpr float kLn2Low = -2.12194440e-4f;
#endif

GFL_HOST_DEVICE float log_(float x) {
#if GFL_DEVICE_MATH
  return logf(x);
#else
  const LogParts parts = log_parts(x);
  float result = parts.exponent * kLn2High + (parts.exponent * kLn2Low + parts.log_mantissa);
  result = select(x == 0.0f, -__builtin_huge_valf(), result);
  result = select(x == __builtin_huge_valf(), x, result);
  result = select(x < 0.0f, __builtin_nanf(""), result);
  return select(x != x, x, result);
#endif
}

// log(1 - p) for p in [0, 1], accurate for small p where 1 - p would round (torch's BCE
// computes log1p(-p)): 2 atanh(-p / (2 - p)) for p <= 1/2 (|s| <= 1/3), and log(1 - p)
// above, where 1 - p is exact.
GFL_HOST_DEVICE float log_one_minus(float p) {
#if GFL_DEVICE_MATH
  return log1pf(-p);
#else
  return select(p <= 0.5f, two_atanh_series(-p / (2.0f - p)), log_(1.0f - p));
#endif
}

// x^beta for x > 0, beta >= 0. Not exp(beta * log x) in float: the exponent's rounding
// error, |beta log x| * eps, would reach the result (1e-6 relative at x = 1e-6, beta = 3).
// The exponent is carried as hi + lo instead (the product beta * exponent * ln2 made exact
// with an fma), and exp(hi + lo) = exp(hi) * (1 + lo). Where |beta log x| >= 100, beyond
// exp's range, the result is 0 or inf whatever the rounding (as powf's), but the exact
// product can overflow there (beta near FLT_MAX) and the two-sum turn inf - inf into NaN:
// there exp of the plain beta * log x is taken.
GFL_HOST_DEVICE float pow_(float x, float beta) {
#if GFL_DEVICE_MATH
  return powf(x, beta);
#else
  const LogParts parts = log_parts(x);
  const float large = parts.exponent * kLn2High;                      // exact
  const float small = parts.exponent * kLn2Low + parts.log_mantissa;  // |small| < 0.38
  const float product = beta * large;
  const float product_error = std::fma(beta, large, -product);  // exact remainder
  const float low = product_error + beta * small;
  // Two-sum: hi + lo == product + low exactly, |lo| <= ulp(hi) / 2.
  const float hi = product + low;
  const float low_part = hi - product;
  const float lo = (product - (hi - low_part)) + (low - low_part);
  const float estimate = beta * (large + small);
  const bool in_range = std::fabs(estimate) < 100.0f;
  const float result = exp_(select(in_range, hi, estimate)) * (1.0f + select(in_range, lo, 0.0f));
  return select(x != x, x, result);
#endif
}

// ::exp and friends are the double functions of math.h on the host and CUDA's on the device.
GFL_HOST_DEVICE double exp_(double x) { return ::exp(x); }
GFL_HOST_DEVICE double log1p_unit(double t) { return ::log1p(t); }
GFL_HOST_DEVICE double log_(double x) { return ::log(x); }
GFL_HOST_DEVICE double log_one_minus(double p) { return ::log1p(-p); }
GFL_HOST_DEVICE double pow_(double x, double beta) { return ::pow(x, beta); }

// ---------------------------------------------------------------------------------------
// Element conversions: an input element to acc_t (to_acc), a result back (from_acc).
//
// On the host, c10::Half's and c10::BFloat16's own conversions from float are written with
// branches (on NaN, on the exponent) that the compiler leaves scalar, and with them the
// kernel loops that store 16-bit results: 5 to 8 times the time per element of float32
// (QFL with gradient). The kernels convert here instead, with c10's own algorithms written
// branch-free on the 16-bit pattern (selects, integer and float arithmetic): vector code,
// and c10's bits for every input (tests/cpu/test_cpu_half_precision.py). On the device, the
// types' own conversions, hardware instructions.
// ---------------------------------------------------------------------------------------

GFL_HOST_DEVICE uint32_t word_of(float value) { return static_cast<uint32_t>(float_to_bits(value)); }
GFL_HOST_DEVICE float float_of(uint32_t word) { return bits_to_float(static_cast<int32_t>(word)); }

// binary16 -> float, exact. In 2w (w: the half's bits in a word's upper half) the exponent
// E sits in bits 27..31 and the mantissa m below:
//   E > 0: (2w >> 4) puts both in float position with the exponent E + 224 (so that E = 31,
//          inf and NaN, becomes 255), then * 2^-112 sets the bias: 2^(E - 15) (1 + m 2^-10);
//   E = 0: m 2^-24 = (0.5 + m 2^-24) - 0.5, the first a float of exponent -1 holding m.
GFL_HOST_DEVICE float half_bits_to_float(uint16_t bits) {
  const uint32_t w = static_cast<uint32_t>(bits) << 16;
  const uint32_t two_w = w + w;
  const float normal = float_of((two_w >> 4) + (224u << 23)) * 0x1.0p-112f;
  const float subnormal = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  return float_of((w & 0x80000000u) | word_of(select(two_w < (1u << 27), subnormal, normal)));
}

// float -> binary16, rounded to nearest even, by the float adder: with e = max(exponent of
// f, -14), the half's spacing at f is 2^(e - 10), and 2^(e + 15) + 4|f| rounds 4|f| to a
// multiple of 4 * 2^(e - 10), to even. That sum's low 12 bits are then |f| / 2^(e - 10), the
// half's mantissa with its leading bit, which added to (e + 14) << 10 (the sum's exponent,
// shifted) gives the half, a carry rounding up into its exponent. 4|f| = |f| 2^112 2^-110,
// which is inf for |f| >= 2^16 (inf too in half). NaN: 0x7E00, with the sign.
GFL_HOST_DEVICE uint16_t float_to_half_bits(float value) {
  const uint32_t w = word_of(value);
  const uint32_t two_w = w + w;  // without the sign
  const uint32_t exponent_bits = two_w & 0xFF000000u;
  const uint32_t clamped = exponent_bits < 0x71000000u ? 0x71000000u : exponent_bits;  // e >= -14
  const float scaled = (float_of(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;        // 4|f|
  const uint32_t sum = word_of(float_of((clamped >> 1) + 0x07800000u) + scaled);
  const uint32_t magnitude = ((sum >> 13) & 0x00007C00u) + (sum & 0x00000FFFu);
  const uint32_t nan_or_magnitude = two_w > 0xFF000000u ? 0x7E00u : magnitude;
  return static_cast<uint16_t>(((w >> 16) & 0x8000u) | nan_or_magnitude);
}

// bfloat16 is float's upper half.
GFL_HOST_DEVICE float bfloat16_bits_to_float(uint16_t bits) { return float_of(static_cast<uint32_t>(bits) << 16); }

// float -> bfloat16, rounded to nearest even: adding 0x7FFF and the lowest kept bit carries
// into the kept half when the dropped half is above 0x8000, or at it with the kept half
// odd. NaN: 0x7FC0 (the addition could carry a NaN into inf, or -0).
GFL_HOST_DEVICE uint16_t float_to_bfloat16_bits(float value) {
  const uint32_t w = word_of(value);
  const uint32_t rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(value != value ? 0x7FC0u : rounded);
}

// Whether scalar_t converts through its bit pattern here: the 16-bit types, on the host.
template <typename scalar_t>
constexpr bool kConvertsBits =
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
    false;
#else
    std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;
#endif

template <typename acc_t, typename scalar_t>
GFL_HOST_DEVICE acc_t to_acc(const scalar_t& value) {
  if constexpr (kConvertsBits<scalar_t>) {
    uint16_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return std::is_same_v<scalar_t, c10::Half> ? half_bits_to_float(bits) : bfloat16_bits_to_float(bits);
  } else {
    return static_cast<acc_t>(value);
  }
}

template <typename scalar_t, typename acc_t>
GFL_HOST_DEVICE scalar_t from_acc(acc_t value) {
  if constexpr (kConvertsBits<scalar_t>) {
    const uint16_t bits =
        std::is_same_v<scalar_t, c10::Half> ? float_to_half_bits(value) : float_to_bfloat16_bits(value);
    scalar_t result;
    std::memcpy(&result, &bits, sizeof(bits));
    return result;
  } else {
    return static_cast<scalar_t>(value);
  }
}

// ---------------------------------------------------------------------------------------
// The classification family, one element: a binary cross-entropy times a modulating weight.
//
//   p = sigma(x) for a logit x (p itself for probability input), t the element's target
//   loss      = w(p, t) * BCE(x, t)
//   d loss/dx = w * dBCE/dx + BCE * dw/dp * dp/dx            (dw/dp = 0 when w is detached)
//
// What changes from loss to loss is w (docs/MATH.md, "The family"):
//   Quality Focal Loss  w = |p - t|^beta
//   sigmoid focal loss  w = alpha_t * |m|^gamma,  m = 1 - p_t = p (1 - 2t) + t,
//                       alpha_t = alpha t + (1 - alpha)(1 - t)
//   varifocal loss      w = (iou_weighted ? t : 1) on positive elements,
//                       alpha * |p - t|^gamma on the others
// Focal and varifocal are one formula with different coefficients (FamilyWeight below);
// QFL, the hottest, is also written on its own, without them.
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct LossAndGrad {
  acc_t loss;
  acc_t grad;  // d loss / d input (0 when the caller did not ask for it)
};

// The exponents with a closed form (no pow): 0 (soft-target BCE), 1, 1.5 (DEIM), 2 (GFL,
// RetinaNet, VFNet); any other takes pow.
enum class Exponent { kZero, kOne, kOneAndHalf, kTwo, kGeneral };

// The closed form that serves an exponent, if any.
inline Exponent exponent_kind(double exponent) {
  return exponent == 0.0   ? Exponent::kZero
         : exponent == 1.0 ? Exponent::kOne
         : exponent == 1.5 ? Exponent::kOneAndHalf
         : exponent == 2.0 ? Exponent::kTwo
                           : Exponent::kGeneral;
}

GFL_HOST_DEVICE float sqrt_(float x) {
#if GFL_DEVICE_MATH
  return sqrtf(x);
#else
  return std::sqrt(x);  // one instruction, vectorised (the build sets -fno-math-errno)
#endif
}
GFL_HOST_DEVICE double sqrt_(double x) { return ::sqrt(x); }

// |d|^e and its derivative e * |d|^(e - 1) * sign(d) = e * |d|^e / d, which is taken as 0 at
// d = 0 for every e (where it is not defined for e < 1). 0^e is 1 for e = 0 (as torch.pow)
// and 0 otherwise. `one_minus_magnitude` is 1 - |d| as the caller knows it without the
// rounding of d (general exponents only): near |d| = 1 the rounding of d is all of the
// information at a large e (focal at x = 20, t = 0: d = sigma(20) rounds to 1 in float, and
// 1^e = 1 where the exact |d|^e is exp(e log1p(-(1 - sigma))) = 0.127 at e = 1e9), so there
// |d|^e is taken as exp(e * log1p(-(1 - |d|))), log space from the accurate complement; below
// 1/2, where d itself is exact to its last digit, pow_. The derivative e * |d|^e / d then
// stays bounded by e / |d| and consistent with the value (0 wherever the value is).
template <Exponent kExponent, typename acc_t>
GFL_HOST_DEVICE LossAndGrad<acc_t> power_of_magnitude(acc_t d, acc_t exponent, acc_t one_minus_magnitude) {
  const acc_t magnitude = d < acc_t(0) ? -d : d;
  const acc_t sign = d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0));
  if constexpr (kExponent == Exponent::kZero) {
    return {acc_t(1), acc_t(0)};
  } else if constexpr (kExponent == Exponent::kOne) {
    return {magnitude, sign};
  } else if constexpr (kExponent == Exponent::kOneAndHalf) {
    const acc_t root = sqrt_(magnitude);
    return {magnitude * root, acc_t(1.5) * root * sign};
  } else if constexpr (kExponent == Exponent::kTwo) {
    return {d * d, acc_t(2) * d};
  } else {
    // A branch, not a select: on the device the 16-bit probability variants' call frames
    // were 80 bytes with a select, 64 with the branch (tools/cuda_machine_code.py's budget);
    // the host's compiler if-converts it, its functions being inline.
    acc_t power;
    if (magnitude > acc_t(0.5)) {
      power = exp_(exponent * log_one_minus(one_minus_magnitude));
    } else {
      power = pow_(magnitude, exponent);
    }
    const acc_t value = magnitude == acc_t(0) ? (exponent == acc_t(0) ? acc_t(1) : acc_t(0)) : power;
    return {value, magnitude == acc_t(0) ? acc_t(0) : exponent * (value / d)};
  }
}

// The BCE of one element and the derivatives the modulating weights need.
template <typename acc_t>
struct BceParts {
  acc_t bce;
  acc_t probability;   // p
  acc_t complement;    // 1 - p, without the rounding of the subtraction for logits
  acc_t dbce_dinput;   // dBCE/dx (dBCE/dp for probability input)
  acc_t dprob_dinput;  // dp/dx (1 for probability input)
};

// Logit input x, target t:
//   BCE(x, t) = (1 - t) * x + softplus(-x),  softplus(-x) = max(-x, 0) + log1p(exp(-|x|))
// (the form of torch's binary_cross_entropy_with_logits, so inf and NaN behave the same);
//   sigma = 1 / (1 + e) for x >= 0, e / (1 + e) otherwise, e = exp(-|x|), and 1 - sigma the other
//   dBCE/dx = sigma - t,  dsigma/dx = sigma * (1 - sigma) = e / (1 + e)^2
// One exp and one log1p per element.
template <typename acc_t>
GFL_HOST_DEVICE BceParts<acc_t> bce_of_logit(acc_t x, acc_t t) {
  const acc_t abs_x = x < acc_t(0) ? -x : x;
  const acc_t e = exp_(-abs_x);
  const acc_t softplus_neg_x = (x < acc_t(0) ? -x : acc_t(0)) + log1p_unit(e);
  const acc_t inv_one_plus_e = acc_t(1) / (acc_t(1) + e);
  const acc_t sigma = x >= acc_t(0) ? inv_one_plus_e : e * inv_one_plus_e;
  const acc_t complement = x >= acc_t(0) ? e * inv_one_plus_e : inv_one_plus_e;
  return {(acc_t(1) - t) * x + softplus_neg_x, sigma, complement, sigma - t, e * inv_one_plus_e * inv_one_plus_e};
}

// Probability input p, target t, as torch's binary_cross_entropy:
//   BCE_p(p, t) = -(t * max(log p, -100) + (1 - t) * max(log1p(-p), -100))
//   dBCE_p/dp  = (p - t) / max(p * (1 - p), 1e-12)      (torch's backward formula)
// in [0, 1]; outside it (and for NaN p) the BCE is NaN and so is dBCE_p/dp, the reference's
// rule, which must not rest on the weight's term (0 for a constant weight: class_element).
template <typename acc_t>
GFL_HOST_DEVICE BceParts<acc_t> bce_of_probability(acc_t p, acc_t t) {
  const acc_t log_p = log_(p);
  const acc_t log_one_minus_p = log_one_minus(p);
  // `v < -100 ? -100 : v` keeps NaN (a comparison with NaN is false).
  const acc_t clamped_log_p = log_p < acc_t(-100) ? acc_t(-100) : log_p;
  const acc_t clamped_log_one_minus_p = log_one_minus_p < acc_t(-100) ? acc_t(-100) : log_one_minus_p;
  const acc_t variance = p * (acc_t(1) - p);
  const bool in_range = (p >= acc_t(0)) & (p <= acc_t(1));
  const acc_t dbce_dp = (p - t) / (variance < acc_t(1e-12) ? acc_t(1e-12) : variance);
  return {-(t * clamped_log_p + (acc_t(1) - t) * clamped_log_one_minus_p), p, acc_t(1) - p,
          in_range ? dbce_dp : std::numeric_limits<acc_t>::quiet_NaN(), acc_t(1)};
}

// Which modulating weight: QFL's |p - t|^beta, or the focal family's general form.
enum class Modulation { kQuality, kFocalFamily };

// The numbers of the focal family's weight, one formula for focal and varifocal:
//   m       = 1 - p_t = p (1 - t) + (1 - p) t    (dm/dp = 1 - 2t) with focal_base = 1,
//             p - t                              (dm/dp = 1)      with focal_base = 0
//   alpha_t = alpha_positive * t + alpha_negative * (1 - t)
//   w       = t (iou_weighted = 1) or 1 (0)      on a positive, with weights_positives = 1
//           = alpha_t * |m|^exponent             on every other element
//   dw/dp   = alpha_t * d|m|^exponent/dm * dm/dp; w is a constant (no gradient through it)
//             on weighted positives and with detach_weight = 1
// focal:     focal_base 1, alphas (alpha, 1 - alpha) (or (1, 1) with the alpha weighting
//            off), no positives; varifocal: focal_base 0, alphas (alpha, alpha), positives
//            weighted, detached for RT-DETR/D-FINE/DEIM. QFL's beta is `exponent` too.
// The switches are numbers, 0 or 1, used in arithmetic (a bool member read in the class loop
// kept GCC from vectorising it: scalar code, 10x slower). 1 - p_t is summed from p and 1 - p,
// both >= 0 for t in [0, 1]: no cancellation (p + t - 2pt would lose 1 - p's digits where p
// is near 1).
template <typename acc_t>
struct ModulationParams {
  acc_t exponent;  // beta (QFL) or gamma
  acc_t alpha_positive;
  acc_t alpha_negative;
  acc_t focal_base;         // 1: m = 1 - p_t; 0: m = p - t
  acc_t weights_positives;  // 1: positives take positive_weight
  acc_t iou_weighted;       // 1: a positive's weight is t; 0: 1
  acc_t detach_weight;      // 1: w carries no gradient
};

// A modulating weight w, its derivative dw/dp, and whether w varies with p at all: not where
// it is a constant by its definition (an exponent of 0, a weighted positive's t or 1, a
// detached weight), which carries no gradient, as autograd gives it (class_element). A
// number, 1 or 0, like ModulationParams' switches: a bool here turned the focal family's
// gradient loops scalar.
template <typename acc_t>
struct ModulatingWeight {
  acc_t value;
  acc_t derivative;  // dw/dp
  acc_t varies;      // 1: w depends on p; 0: a constant
};

// 1 - |m| of m = p (1 - f t) + (1 - p) f t + (f - 1) t, summed from p, 1 - p and t without
// cancellation: 1 - p_t = p t + (1 - p)(1 - t) for f = 1, and for f = 0 (m = p - t)
// (1 - p) + t where m >= 0, p + (1 - t) where m < 0. Read by general exponents only.
template <typename acc_t>
GFL_HOST_DEVICE acc_t one_minus_magnitude(acc_t m, acc_t p, acc_t complement, acc_t t, acc_t focal_base) {
  const acc_t focal_t = focal_base * t;
  return m >= acc_t(0) ? complement * (acc_t(1) - focal_t) + p * focal_t + (acc_t(1) - focal_base) * t
                       : p + (acc_t(1) - t);
}

// w and dw/dp of one element of probability p (and 1 - p, `complement`). `positive` is the
// target's own rule (used with weights_positives only).
template <Modulation kModulation, Exponent kExponent, typename acc_t>
GFL_HOST_DEVICE ModulatingWeight<acc_t> modulating_weight(acc_t p, acc_t complement, acc_t t, bool positive,
                                                          const ModulationParams<acc_t>& params) {
  constexpr acc_t kPowerVaries = kExponent == Exponent::kZero ? acc_t(0) : acc_t(1);
  if constexpr (kModulation == Modulation::kQuality) {
    const acc_t d = p - t;
    const acc_t rest = kExponent == Exponent::kGeneral ? one_minus_magnitude(d, p, complement, t, acc_t(0)) : acc_t(0);
    const LossAndGrad<acc_t> power = power_of_magnitude<kExponent>(d, params.exponent, rest);
    return {power.loss, power.grad, kPowerVaries};
  } else {
    const acc_t focal_t = params.focal_base * t;
    const acc_t m = p * (acc_t(1) - focal_t) + complement * focal_t + (params.focal_base - acc_t(1)) * t;
    const acc_t slope = acc_t(1) - acc_t(2) * focal_t;  // dm/dp
    const acc_t rest =
        kExponent == Exponent::kGeneral ? one_minus_magnitude(m, p, complement, t, params.focal_base) : acc_t(0);
    const LossAndGrad<acc_t> power = power_of_magnitude<kExponent>(m, params.exponent, rest);
    const acc_t alpha_t = params.alpha_positive * t + params.alpha_negative * (acc_t(1) - t);
    const bool weighted_positive = positive & (params.weights_positives != acc_t(0));
    const acc_t positive_weight = params.iou_weighted * t + (acc_t(1) - params.iou_weighted);
    const bool constant = weighted_positive | (params.detach_weight != acc_t(0));
    return {weighted_positive ? positive_weight : alpha_t * power.loss, alpha_t * power.grad * slope,
            constant ? acc_t(0) : kPowerVaries};
  }
}

// Flags of one instantiation, as template parameters so inner loops are branch-free.
// kElementIO: the kernel reads a weight of pred's shape or writes the loss of each element
// (rare layouts of the work, taken by the general walks only).
template <Modulation kModulation_, Exponent kExponent_, bool kActivated_, bool kNeedGrad_, bool kElementIO_ = false>
struct ClassVariant {
  static constexpr Modulation kModulation = kModulation_;
  static constexpr Exponent kExponent = kExponent_;
  static constexpr bool kActivated = kActivated_;
  static constexpr bool kNeedGrad = kNeedGrad_;
  static constexpr bool kElementIO = kElementIO_;
};

// One element's loss w * BCE and its derivative with respect to the input,
//   d(w BCE)/dinput = w dBCE/dinput + BCE dw/dp dp/dinput,
// the second term left out where w is a constant by definition (an exponent of 0, a weighted
// positive, a detached weight): there autograd has no such term, and an infinite logit's
// infinite BCE must not turn its 0 into NaN.
template <typename Variant, typename acc_t>
GFL_HOST_DEVICE LossAndGrad<acc_t> class_element(acc_t input, acc_t t, bool positive,
                                                 const ModulationParams<acc_t>& params) {
  const BceParts<acc_t> bce = Variant::kActivated ? bce_of_probability(input, t) : bce_of_logit(input, t);
  const ModulatingWeight<acc_t> weight =
      modulating_weight<Variant::kModulation, Variant::kExponent>(bce.probability, bce.complement, t, positive, params);
  if (!Variant::kNeedGrad) {
    return {weight.value * bce.bce, acc_t(0)};
  }
  const acc_t through_weight = weight.varies == acc_t(0) ? acc_t(0) : bce.bce * weight.derivative * bce.dprob_dinput;
  return {weight.value * bce.bce, weight.value * bce.dbce_dinput + through_weight};
}

// The target of class c for an anchor with (label, score): the score on the labelled class,
// 0 elsewhere. A label outside [0, C) (background: C, -1, ...) matches no class.
template <typename acc_t, typename label_t>
GFL_HOST_DEVICE acc_t label_target(int64_t class_index, label_t label, acc_t score) {
  return static_cast<int64_t>(label) == class_index ? score : acc_t(0);
}

// The ways a target arrives, read through one interface: at(anchor, class, element) with
// `element` the target's own offset (used by the dense form only), and positive(...),
// whether the element is a positive (varifocal's weight): in the label forms the labelled
// class whatever its score (RT-DETR, ultralytics), in the dense form t > 0 (mmdetection).
// Labels come with a score per anchor (QFL, varifocal) or alone (focal: a score of 1).
template <typename acc_t, bool kHasScores = true>
struct LabelTarget {
  const int64_t* labels;  // one per anchor, contiguous
  const acc_t* scores;    // one per anchor, contiguous; unused without kHasScores
  GFL_HOST_DEVICE acc_t at(int64_t anchor, int64_t class_index, int64_t /*element*/) const {
    return label_target(class_index, labels[anchor], kHasScores ? scores[anchor] : acc_t(1));
  }
  GFL_HOST_DEVICE bool positive(int64_t anchor, int64_t class_index, acc_t /*t*/) const {
    return labels[anchor] == class_index;
  }
};

template <typename scalar_t, typename acc_t>
struct DenseTarget {
  const scalar_t* values;  // laid out like pred, addressed through its own strides
  GFL_HOST_DEVICE acc_t at(int64_t /*anchor*/, int64_t /*class*/, int64_t element) const {
    return to_acc<acc_t>(values[element]);
  }
  GFL_HOST_DEVICE bool positive(int64_t /*anchor*/, int64_t /*class*/, acc_t t) const { return t > acc_t(0); }
};

// Sums over classes are taken in chunks of this many classes, then the chunk sums are
// added: the rounding error of a per-anchor loss grows with C / kClassChunk + kClassChunk
// rather than with C (C = 1203 for LVIS), whether or not a loop vectorises.
constexpr int64_t kClassChunk = 128;

// The weight of class c: class_weight[c], or 1 without class weights.
template <typename acc_t>
GFL_HOST_DEVICE acc_t class_weight_at(const acc_t* class_weight, int64_t c) {
  return class_weight == nullptr ? acc_t(1) : class_weight[c];
}

#if !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
// kClassChunk ones: the class weights of a chunk of classes where the caller gave none, so
// that a vectorised class loop reads its weights unconditionally with unit stride (a select
// on a null pointer would make each load conditional, and the loop scalar).
template <typename acc_t>
struct UnitClassWeights {
  static constexpr auto kValues = [] {
    std::array<acc_t, kClassChunk> ones{};
    for (acc_t& one : ones) {
      one = acc_t(1);
    }
    return ones;
  }();
};
#endif

// One anchor's classes in every tensor: where each starts and its class stride (elements).
// Callers pass a literal 1 where classes are contiguous so the class loop vectorises on
// the host. The element tensors are used by ClassVariant::kElementIO instantiations only.
template <typename scalar_t, typename acc_t>
struct AnchorRow {
  const scalar_t* pred;
  int64_t pred_stride;
  scalar_t* grad;  // null without kNeedGrad
  int64_t grad_stride;
  int64_t target_offset, target_stride;  // the dense target's
  const acc_t* class_weight;             // (C,), contiguous; null: every weight is 1
  const acc_t* element_weight;           // pred's shape; null: none
  int64_t element_weight_stride;
  acc_t* element_loss;  // pred's shape; null: none
  int64_t element_loss_stride;
};

// One anchor: loss = weight * sum_c class_weight[c] * element_weight * loss_c, and the
// gradient of that loss into grad when asked (and each term into element_loss).
template <typename Variant, typename scalar_t, typename acc_t, typename Target>
GFL_HOST_DEVICE acc_t class_anchor(const AnchorRow<scalar_t, acc_t>& row, const Target& target, int64_t anchor,
                                   int64_t num_classes, const ModulationParams<acc_t>& params, acc_t weight) {
  acc_t loss = 0;
  for (int64_t chunk_begin = 0; chunk_begin < num_classes; chunk_begin += kClassChunk) {
    const int64_t chunk_end = chunk_begin + kClassChunk < num_classes ? chunk_begin + kClassChunk : num_classes;
#if !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
    // This chunk's class weights, indexed by c - chunk_begin (see UnitClassWeights).
    const acc_t* chunk_weights =
        row.class_weight != nullptr ? row.class_weight + chunk_begin : UnitClassWeights<acc_t>::kValues.data();
#endif
    acc_t chunk_loss = 0;
    GFL_SIMD(reduction(+ : chunk_loss))
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      const acc_t t = target.at(anchor, c, row.target_offset + c * row.target_stride);
      const LossAndGrad<acc_t> element = class_element<Variant>(to_acc<acc_t>(row.pred[c * row.pred_stride]), t,
                                                                target.positive(anchor, c, t), params);
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
      acc_t scale = class_weight_at(row.class_weight, c);  // a uniform branch on the device
#else
      acc_t scale = chunk_weights[c - chunk_begin];
#endif
      if constexpr (Variant::kElementIO) {
        scale *= row.element_weight == nullptr ? acc_t(1) : row.element_weight[c * row.element_weight_stride];
        if (row.element_loss != nullptr) {
          row.element_loss[c * row.element_loss_stride] = weight * scale * element.loss;
        }
      }
      chunk_loss += scale * element.loss;
      if (Variant::kNeedGrad) {
        row.grad[c * row.grad_stride] = from_acc<scalar_t>(weight * scale * element.grad);
      }
    }
    loss += chunk_loss;
  }
  return weight * loss;
}

// ---------------------------------------------------------------------------------------
// Distribution Focal Loss and the integral, over the n + 1 bins 0..n of one row.
//
//   i = min(floor(y), n - 1), w_l = (i + 1) - y, w_r = y - i   (so y = n is valid)
//   m = max_k z_k,  S = sum_k exp(z_k - m),  softmax_k = exp(z_k - m) / S
//   DFL = log S - w_l * (z_i - m) - w_r * (z_{i+1} - m)
//   dDFL/dz_k = softmax_k - w_l * [k == i] - w_r * [k == i + 1]
//   E = sum_k softmax_k * k,  dE/dz_k = softmax_k * (k - E)
//
// DFL is log-sum-exp minus the logits on the target's bins, taken relative to m: in absolute
// terms, m + log S - w_l z_i - w_r z_{i+1}, the loss (a few units) would be the difference of
// terms as large as the logits, and lose their rounding error (2.7734 for log 16 at logits of
// 1e5, negative losses at 1e38).
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct DflBins {
  int64_t left;        // i
  acc_t weight_left;   // w_l, on bin i
  acc_t weight_right;  // w_r, on bin i + 1
};

// The two bins around the target. The target is clamped into [0, n] first (NaN -> 0), so
// the bins are in range whatever the target holds; validation happens before the kernel.
template <typename acc_t>
GFL_HOST_DEVICE DflBins<acc_t> dfl_bins(acc_t target, int64_t num_bins) {
  const acc_t last_bin = static_cast<acc_t>(num_bins - 1);
  acc_t y = target > acc_t(0) ? target : acc_t(0);  // NaN compares false -> 0
  y = y < last_bin ? y : last_bin;
  int64_t left = static_cast<int64_t>(y);  // floor, y >= 0
  left = left < num_bins - 2 ? left : num_bins - 2;
  const acc_t weight_left = static_cast<acc_t>(left + 1) - y;
  return {left, weight_left, acc_t(1) - weight_left};
}

template <typename acc_t>
GFL_HOST_DEVICE acc_t dfl_loss(acc_t row_max, acc_t sum_exp, acc_t z_left, acc_t z_right, const DflBins<acc_t>& bins) {
  return log_(sum_exp) - bins.weight_left * (z_left - row_max) - bins.weight_right * (z_right - row_max);
}

template <typename acc_t>
GFL_HOST_DEVICE acc_t dfl_grad(acc_t softmax_k, int64_t k, const DflBins<acc_t>& bins) {
  return softmax_k - (k == bins.left ? bins.weight_left : acc_t(0)) -
         (k == bins.left + 1 ? bins.weight_right : acc_t(0));
}

template <typename acc_t>
GFL_HOST_DEVICE acc_t integral_grad(acc_t softmax_k, int64_t k, acc_t expectation) {
  return softmax_k * (static_cast<acc_t>(k) - expectation);
}

// The steps of a row's statistics, one bin at a time. The one-row functions below take them
// along a row; the CPU's block walk takes each across 16 rows at once (a row of 17 bins is
// too short to vectorise on its own), bin after bin.

// m: the running maximum. A NaN logit need not win it: exp(NaN - m) makes S, and so the
// row, NaN.
template <typename acc_t>
GFL_HOST_DEVICE acc_t max_step(acc_t row_max, acc_t z_k) {
  return z_k > row_max ? z_k : row_max;
}

// exp(z_k - m): a term of S, and softmax_k = exp(z_k - m) / S.
template <typename acc_t>
GFL_HOST_DEVICE acc_t shifted_exp(acc_t z_k, acc_t row_max) {
  return exp_(z_k - row_max);
}

// exp(z_k - m) * k: a term of sum_k exp(z_k - m) * k = E * S.
template <typename acc_t>
GFL_HOST_DEVICE acc_t weighted_term(acc_t shifted_k, int64_t k) {
  return shifted_k * static_cast<acc_t>(k);
}

// m and S of a row.
template <typename acc_t, typename scalar_t>
GFL_HOST_DEVICE void row_softmax_stats(const scalar_t* z, int64_t bin_stride, int64_t num_bins, acc_t& row_max,
                                       acc_t& sum_exp) {
  row_max = to_acc<acc_t>(z[0]);
  GFL_SIMD(reduction(max : row_max))
  for (int64_t k = 1; k < num_bins; ++k) {
    row_max = max_step(row_max, to_acc<acc_t>(z[k * bin_stride]));
  }
  sum_exp = 0;
  GFL_SIMD(reduction(+ : sum_exp))
  for (int64_t k = 0; k < num_bins; ++k) {
    sum_exp += shifted_exp(to_acc<acc_t>(z[k * bin_stride]), row_max);
  }
}

// One row of DFL: returns weight * DFL; writes its gradient into grad unless grad is null.
template <typename acc_t, typename scalar_t>
GFL_HOST_DEVICE acc_t dfl_row(const scalar_t* z, int64_t bin_stride, int64_t num_bins, acc_t target, acc_t weight,
                              scalar_t* grad, int64_t grad_bin_stride) {
  acc_t row_max, sum_exp;
  row_softmax_stats(z, bin_stride, num_bins, row_max, sum_exp);
  const DflBins<acc_t> bins = dfl_bins(target, num_bins);
  const acc_t loss = dfl_loss(row_max, sum_exp, to_acc<acc_t>(z[bins.left * bin_stride]),
                              to_acc<acc_t>(z[(bins.left + 1) * bin_stride]), bins);
  if (grad != nullptr) {
    const acc_t inv_sum = acc_t(1) / sum_exp;
    GFL_SIMD()
    for (int64_t k = 0; k < num_bins; ++k) {
      const acc_t softmax_k = shifted_exp(to_acc<acc_t>(z[k * bin_stride]), row_max) * inv_sum;
      grad[k * grad_bin_stride] = from_acc<scalar_t>(weight * dfl_grad(softmax_k, k, bins));
    }
  }
  return weight * loss;
}

// One row of the integral: returns E; writes grad_scale * dE/dz into grad unless grad is
// null (scaled before it is rounded to pred's dtype).
template <typename acc_t, typename scalar_t>
GFL_HOST_DEVICE acc_t integral_row(const scalar_t* z, int64_t bin_stride, int64_t num_bins, acc_t grad_scale,
                                   scalar_t* grad, int64_t grad_bin_stride) {
  acc_t row_max, sum_exp;
  row_softmax_stats(z, bin_stride, num_bins, row_max, sum_exp);
  const acc_t inv_sum = acc_t(1) / sum_exp;
  acc_t weighted_sum = 0;  // E * S
  GFL_SIMD(reduction(+ : weighted_sum))
  for (int64_t k = 0; k < num_bins; ++k) {
    weighted_sum += weighted_term(shifted_exp(to_acc<acc_t>(z[k * bin_stride]), row_max), k);
  }
  const acc_t expectation = weighted_sum * inv_sum;
  if (grad != nullptr) {
    GFL_SIMD()
    for (int64_t k = 0; k < num_bins; ++k) {
      const acc_t softmax_k = shifted_exp(to_acc<acc_t>(z[k * bin_stride]), row_max) * inv_sum;
      grad[k * grad_bin_stride] = from_acc<scalar_t>(grad_scale * integral_grad(softmax_k, k, expectation));
    }
  }
  return expectation;
}

}  // namespace math
}  // namespace gfl
