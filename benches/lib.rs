//! Benchmarks of the sd-* crates' hot paths; run them with `cargo bench -p sd-benches`.
//! Each prints its time and, where it computes, its GFLOP/s and the fraction of this
//! machine's measured peak. This library target holds what the benchmarks share:
//! [`Profiled`], a backend wrapper that times every operation and counts the work of the
//! products, and a few readings of the process (peak RSS, CPU time).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_models::backend::{
    ActivationOps, AttentionMask, AttentionOps, BackendBase, Conv2dParams, ConvOps, DType, DataOps,
    ElementwiseOps, GeluApproximation, HalfData, MatmulOps, NormOps, ResampleOps,
};
use sd_models::{Backend, Result};

/// Time, calls and floating-point operations (a multiply-add counts 2) of one operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpStats {
    /// Calls.
    pub calls: u64,
    /// Wall time inside the operation.
    pub time: Duration,
    /// Floating-point operations of the products (0 for the others).
    pub flops: u64,
}

/// A backend that forwards every operation to `B` and records, per operation name, its
/// calls, wall time and the floating-point work of products (matmul, linear, conv2d,
/// attention). The record is shared by clones.
#[derive(Debug, Clone)]
pub struct Profiled<B> {
    inner: B,
    stats: Arc<Mutex<BTreeMap<&'static str, OpStats>>>,
    shapes: Arc<Mutex<BTreeMap<String, OpStats>>>,
    enabled: bool,
    by_shape: bool,
}

impl<B: Backend> Profiled<B> {
    /// Wraps `inner`; `enabled: false` records nothing (and costs nothing measurable).
    pub fn new(inner: B, enabled: bool) -> Self {
        Profiled {
            inner,
            stats: Arc::default(),
            shapes: Arc::default(),
            enabled,
            by_shape: false,
        }
    }

    /// Also records the products (linear, matmul, convolutions, attention) per operand
    /// shapes: see [`Profiled::shape_stats`].
    pub fn with_shapes(mut self) -> Self {
        self.by_shape = true;
        self
    }

    /// What has been recorded per product and operand shapes (with [`Profiled::with_shapes`]),
    /// keyed by the operation's name followed by its operands' shapes.
    pub fn shape_stats(&self) -> BTreeMap<String, OpStats> {
        self.shapes.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// What has been recorded, by operation name.
    pub fn stats(&self) -> BTreeMap<&'static str, OpStats> {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Forgets what has been recorded.
    pub fn reset(&self) {
        if let Ok(mut s) = self.stats.lock() {
            s.clear();
        }
        if let Ok(mut s) = self.shapes.lock() {
            s.clear();
        }
    }

    /// The floating-point operations recorded, in all.
    pub fn total_flops(&self) -> u64 {
        self.stats().values().map(|s| s.flops).sum()
    }

    fn record<T>(&self, op: &'static str, flops: u64, f: impl FnOnce() -> T) -> T {
        self.record_product(op, &[], flops, f)
    }

    /// As `record`, and under `op` with the shapes of `operands` when recording by shape.
    fn record_product<T>(
        &self,
        op: &'static str,
        operands: &[&B::Tensor],
        flops: u64,
        f: impl FnOnce() -> T,
    ) -> T {
        if !self.enabled {
            return f();
        }
        let key = (self.by_shape && !operands.is_empty()).then(|| {
            let shapes: Vec<String> = operands
                .iter()
                .map(|t| format!("{:?}", self.inner.shape(t)))
                .collect();
            format!("{op} {}", shapes.join(" "))
        });
        let t0 = Instant::now();
        let out = f();
        let dt = t0.elapsed();
        let add = |e: &mut OpStats| {
            e.calls += 1;
            e.time += dt;
            e.flops += flops;
        };
        if let Ok(mut s) = self.stats.lock() {
            add(s.entry(op).or_default());
        }
        if let Some(key) = key
            && let Ok(mut s) = self.shapes.lock()
        {
            add(s.entry(key).or_default());
        }
        out
    }
}

impl<B: Backend> BackendBase for Profiled<B> {
    type Tensor = B::Tensor;

    fn name(&self) -> String {
        format!("profiled {}", self.inner.name())
    }

    fn shape<'a>(&self, tensor: &'a Self::Tensor) -> &'a [usize] {
        self.inner.shape(tensor)
    }

    fn dtype(&self, tensor: &Self::Tensor) -> DType {
        self.inner.dtype(tensor)
    }
}

impl<B: Backend> DataOps for Profiled<B> {
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        self.record("upload", 0, || self.inner.upload(data, shape))
    }

    fn upload_half(&self, data: HalfData<'_>, shape: &[usize]) -> Result<Self::Tensor> {
        self.record("upload", 0, || self.inner.upload_half(data, shape))
    }

    fn download(&self, tensor: &Self::Tensor) -> Result<Vec<f32>> {
        self.record("download", 0, || self.inner.download(tensor))
    }

    fn upload_vec(&self, data: Vec<f32>, shape: &[usize]) -> Result<Self::Tensor> {
        self.record("upload", 0, || self.inner.upload_vec(data, shape))
    }

    fn host_values<'a>(&self, tensor: &'a Self::Tensor) -> Result<Cow<'a, [f32]>> {
        self.record("download", 0, || self.inner.host_values(tensor))
    }

    fn reshape(&self, tensor: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        self.record("reshape", 0, || self.inner.reshape(tensor, shape))
    }

    fn permute(&self, tensor: &Self::Tensor, axes: &[usize]) -> Result<Self::Tensor> {
        self.record("permute", 0, || self.inner.permute(tensor, axes))
    }

    fn slice(
        &self,
        tensor: &Self::Tensor,
        axis: usize,
        start: usize,
        len: usize,
    ) -> Result<Self::Tensor> {
        self.record("slice", 0, || self.inner.slice(tensor, axis, start, len))
    }

    fn concat(&self, tensors: &[&Self::Tensor], axis: usize) -> Result<Self::Tensor> {
        self.record("concat", 0, || self.inner.concat(tensors, axis))
    }

    fn cast(&self, tensor: &Self::Tensor, dtype: DType) -> Result<Self::Tensor> {
        self.record("cast", 0, || self.inner.cast(tensor, dtype))
    }
}

impl<B: Backend> ElementwiseOps for Profiled<B> {
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        self.record("add", 0, || self.inner.add(a, b))
    }

    fn sub(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        self.record("sub", 0, || self.inner.sub(a, b))
    }

    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        self.record("mul", 0, || self.inner.mul(a, b))
    }

    fn affine(&self, x: &Self::Tensor, scale: f32, shift: f32) -> Result<Self::Tensor> {
        self.record("affine", 0, || self.inner.affine(x, scale, shift))
    }
}

fn product(shape: &[usize]) -> u64 {
    shape.iter().map(|&d| d as u64).product()
}

/// The work of a convolution of `x` (upsampled `up` times) with `weight`.
fn conv_flops(sx: &[usize], sw: &[usize], params: Conv2dParams, up: usize) -> u64 {
    match (sx, sw) {
        ([n, _, h, w], [o, c, kh, kw]) => params
            .output_size(up * h, up * w, *kh, *kw)
            .map_or(0, |(ho, wo)| 2 * product(&[*n, *o, ho, wo, *c, *kh, *kw])),
        _ => 0,
    }
}

impl<B: Backend> MatmulOps for Profiled<B> {
    fn prepare_linear_weight(&self, weight: Self::Tensor) -> Result<Self::Tensor> {
        self.inner.prepare_linear_weight(weight)
    }

    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        let (sa, sb) = (self.shape(a), self.shape(b));
        let n = sb.last().copied().unwrap_or(0) as u64;
        let flops = 2 * product(sa) * n;
        self.record_product("matmul", &[a, b], flops, || self.inner.matmul(a, b))
    }

    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let out = self.shape(weight).first().copied().unwrap_or(0) as u64;
        let flops = 2 * product(self.shape(x)) * out;
        self.record_product("linear", &[x, weight], flops, || {
            self.inner.linear(x, weight, bias)
        })
    }
}

impl<B: Backend> ConvOps for Profiled<B> {
    fn prepare_conv_weight(&self, weight: Self::Tensor) -> Result<Self::Tensor> {
        self.inner.prepare_conv_weight(weight)
    }

    fn conv2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: Conv2dParams,
    ) -> Result<Self::Tensor> {
        let (sx, sw) = (self.shape(x), self.shape(weight));
        let flops = conv_flops(sx, sw, params, 1);
        let name = match sw {
            [_, _, 1, 1] => "conv2d 1x1",
            _ => "conv2d 3x3",
        };
        self.record_product(name, &[x, weight], flops, || {
            self.inner.conv2d(x, weight, bias, params)
        })
    }

    fn upsample_nearest2x_conv2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: Conv2dParams,
    ) -> Result<Self::Tensor> {
        let flops = conv_flops(self.shape(x), self.shape(weight), params, 2);
        self.record_product("upsample + conv2d 3x3", &[x, weight], flops, || {
            self.inner
                .upsample_nearest2x_conv2d(x, weight, bias, params)
        })
    }
}

impl<B: Backend> ActivationOps for Profiled<B> {
    fn silu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.record("silu", 0, || self.inner.silu(x))
    }

    fn gelu(&self, x: &Self::Tensor, approximation: GeluApproximation) -> Result<Self::Tensor> {
        self.record("gelu", 0, || self.inner.gelu(x, approximation))
    }

    fn quick_gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.record("quick_gelu", 0, || self.inner.quick_gelu(x))
    }

    fn softmax_last(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.record("softmax", 0, || self.inner.softmax_last(x))
    }

    fn geglu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.record("geglu", 0, || self.inner.geglu(x))
    }
}

impl<B: Backend> NormOps for Profiled<B> {
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.record("group_norm", 0, || {
            self.inner.group_norm(x, groups, gamma, beta, eps)
        })
    }

    fn group_norm_silu(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.record("group_norm_silu", 0, || {
            self.inner.group_norm_silu(x, groups, gamma, beta, eps)
        })
    }

    fn layer_norm(
        &self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.record("layer_norm", 0, || {
            self.inner.layer_norm(x, gamma, beta, eps)
        })
    }
}

impl<B: Backend> AttentionOps for Profiled<B> {
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        mask: AttentionMask<'_, Self::Tensor>,
        scale: f32,
    ) -> Result<Self::Tensor> {
        let flops = match (self.shape(q), self.shape(k), self.shape(v)) {
            ([b, h, lq, d], [_, _, lk, _], [_, _, _, dv]) => {
                2 * product(&[*b, *h, *lq, *lk]) * (*d as u64 + *dv as u64)
            }
            _ => 0,
        };
        self.record_product("attention", &[q, k, v], flops, || {
            self.inner.attention(q, k, v, mask, scale)
        })
    }
}

impl<B: Backend> ResampleOps for Profiled<B> {
    fn upsample_nearest2x(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.record("upsample", 0, || self.inner.upsample_nearest2x(x))
    }
}

/// This process's peak resident set (`VmHWM` of `/proc/self/status`), in bytes; `None` where
/// the file is not there.
pub fn peak_rss() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// This process's resident set now (`VmRSS`), in bytes.
pub fn current_rss() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time this process has used (user + system, all threads), from `/proc/self/stat`
/// (clock ticks of 1/100 s, the Linux default).
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Minor page faults this process has taken (`/proc/self/stat`): each is a first touch of
/// a fresh page (or a copy-on-write).
pub fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(7)?.parse().ok()
}

/// The weight dtype a `--dtype f32|f16|bf16` argument names.
///
/// # Errors
/// The argument, if it names none of them.
pub fn parse_dtype(arg: Option<&str>) -> std::result::Result<DType, String> {
    match arg {
        Some("f32") => Ok(DType::F32),
        Some("f16") => Ok(DType::F16),
        Some("bf16") => Ok(DType::BF16),
        other => Err(format!("--dtype f32|f16|bf16, not {other:?}")),
    }
}

/// The CPU backend multiplying in bf16 (`--bf16`) or in f32.
///
/// # Errors
/// [`sd_models::Error::Unsupported`] for bf16 on a CPU without AVX512-BF16.
pub fn cpu_backend(bf16: bool) -> Result<sd_models::CpuBackend> {
    let precision = if bf16 {
        sd_models::cpu::CpuPrecision::Bf16
    } else {
        sd_models::cpu::CpuPrecision::F32
    };
    sd_models::CpuBackend::new().with_precision(precision)
}

/// `n` deterministic inputs in [-0.5, 0.5] (a sine of the index, shifted by `seed`): the
/// benchmarks' stand-in for images, latents and embeddings, whose values do not change the
/// time.
pub fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32) * 0.618 + seed).sin() * 0.5)
        .collect()
}

/// The median of some durations (0 for none).
pub fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// The machine's arithmetic peak on `threads` threads, in GFLOP/s: a loop of independent
/// AVX-512 f32 fused multiply-adds, and of AVX512-BF16 dot products (`vdpbf16ps`, 64
/// FLOP each), where the CPU has them. What the GEMMs are measured against besides the
/// 2048^3 product.
pub fn fma_peak(threads: usize) -> (Option<f64>, Option<f64>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;

        const ITERS: usize = 20_000_000;

        #[target_feature(enable = "avx512f")]
        fn fma_loop() -> f32 {
            let a = _mm512_set1_ps(1.000_000_1);
            let b = _mm512_set1_ps(0.999_999_9);
            let mut acc = [_mm512_setzero_ps(); 12];
            for _ in 0..ITERS {
                for r in acc.iter_mut() {
                    *r = _mm512_fmadd_ps(*r, a, b);
                }
            }
            acc.iter().map(|&r| _mm512_reduce_add_ps(r)).sum()
        }

        #[target_feature(enable = "avx512f,avx512bf16")]
        fn dp_loop() -> f32 {
            // SAFETY: a bf16 vector is 512 bits like the integer one it is made from.
            let one: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi16(0x3f80)) };
            let mut acc = [_mm512_setzero_ps(); 12];
            for _ in 0..ITERS {
                for r in acc.iter_mut() {
                    *r = _mm512_dpbf16_ps(*r, one, one);
                }
            }
            acc.iter().map(|&r| _mm512_reduce_add_ps(r)).sum()
        }

        let time = |f: fn() -> f32, flops_per_iter: f64| {
            let t0 = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| std::hint::black_box(f()));
                }
            });
            (ITERS * threads) as f64 * flops_per_iter / t0.elapsed().as_secs_f64() / 1e9
        };
        let f32_peak = std::arch::is_x86_feature_detected!("avx512f").then(|| {
            // SAFETY: AVX-512F was detected.
            time(|| unsafe { fma_loop() }, 12.0 * 16.0 * 2.0)
        });
        let bf16_peak = (std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16"))
        .then(|| {
            // SAFETY: AVX-512F and AVX512-BF16 were detected.
            time(|| unsafe { dp_loop() }, 12.0 * 16.0 * 4.0)
        });
        (f32_peak, bf16_peak)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        (None, None)
    }
}
