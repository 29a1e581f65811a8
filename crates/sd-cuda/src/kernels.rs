//! The CUDA kernels: their sources, their names (as a Rust enum), and their compilation by
//! NVRTC for a device's architecture, cached once per process.
//!
//! The sources are the `kernels/*.cu` files of this crate: templates and one macro per entry
//! point. A program for NVRTC is `kernels/common.cuh`, a file, and the macro invocations of
//! the kernels wanted ([`Kernel::instantiation`]); NVRTC gets no include path (the PyPI build
//! of NVRTC has no CUDA headers, so the kernels include none). [`Kernel`] names every entry
//! point; [`Kernel::name`] is its `extern "C"` symbol.
//!
//! The backend compiles a [`Unit`] on first use: a whole light module, or a single kernel of
//! the heavy ones (convolution, attention: seconds each), for the device's own architecture
//! (a cubin; PTX for the newest architecture NVRTC knows when it does not know the device's),
//! and keeps it for the process, per architecture. [`compile`] needs only NVRTC (no driver,
//! no GPU), so the tests compile every module for sm_80 and sm_90 on any machine.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use sd_models::backend::DType;

use crate::error::{CudaError, Result};
use crate::loader;

/// A GPU architecture, `sm_{major}{minor}` (compute capability `major.minor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    /// Compute capability, major part.
    pub major: u32,
    /// Compute capability, minor part.
    pub minor: u32,
}

impl Arch {
    /// Ampere (A100): the oldest architecture the kernels support.
    pub const SM80: Arch = Arch { major: 8, minor: 0 };
    /// Hopper (H100, H200): the target.
    pub const SM90: Arch = Arch { major: 9, minor: 0 };

    /// The number NVRTC uses (90 for sm_90).
    pub fn number(self) -> u32 {
        self.major * 10 + self.minor
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// A kernel source file, compiled as one NVRTC program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    /// Casts, permutes, strided block copies (`data.cu`).
    Data,
    /// Broadcast arithmetic, scalar activations, bias rows (`elementwise.cu`).
    Elementwise,
    /// Softmax and GEGLU (`activation.cu`).
    Activation,
    /// Group and layer norm (`norm.cu`).
    Norm,
    /// Nearest-neighbour upsampling (`resample.cu`).
    Resample,
    /// Implicit-GEMM convolution (`conv.cu`).
    Conv,
    /// Fused flash attention (`attention.cu`).
    Attention,
}

/// `kernels/common.cuh`: the types, conversions, MMA wrapper and reductions every module
/// starts with.
pub const COMMON_HEADER: &str = include_str!("../kernels/common.cuh");

impl Module {
    /// Every module.
    pub const ALL: [Module; 7] = [
        Module::Data,
        Module::Elementwise,
        Module::Activation,
        Module::Norm,
        Module::Resample,
        Module::Conv,
        Module::Attention,
    ];

    /// The source file's name.
    pub fn file_name(self) -> &'static str {
        match self {
            Module::Data => "data.cu",
            Module::Elementwise => "elementwise.cu",
            Module::Activation => "activation.cu",
            Module::Norm => "norm.cu",
            Module::Resample => "resample.cu",
            Module::Conv => "conv.cu",
            Module::Attention => "attention.cu",
        }
    }

    /// The file's text (templates and entry-point macros, no instantiations).
    pub fn body(self) -> &'static str {
        match self {
            Module::Data => include_str!("../kernels/data.cu"),
            Module::Elementwise => include_str!("../kernels/elementwise.cu"),
            Module::Activation => include_str!("../kernels/activation.cu"),
            Module::Norm => include_str!("../kernels/norm.cu"),
            Module::Resample => include_str!("../kernels/resample.cu"),
            Module::Conv => include_str!("../kernels/conv.cu"),
            Module::Attention => include_str!("../kernels/attention.cu"),
        }
    }

    /// The program NVRTC compiles for the whole module: `common.cuh`, the file, then every
    /// kernel's instantiation (with `#line` markers, so that compiler messages name the right
    /// file and line).
    pub fn source(self) -> String {
        let kernels: Vec<Kernel> = Kernel::all()
            .into_iter()
            .filter(|k| k.module() == self)
            .collect();
        program(self, &kernels)
    }

    /// Whether the backend compiles its kernels one at a time (the heavy templates: each
    /// convolution or attention kernel takes seconds, and a network needs a few of them).
    pub fn per_kernel(self) -> bool {
        matches!(self, Module::Conv | Module::Attention)
    }
}

/// `common.cuh`, the module's file, and the instantiations of `kernels` (of that module).
fn program(module: Module, kernels: &[Kernel]) -> String {
    let mut src = format!(
        "#line 1 \"common.cuh\"\n{COMMON_HEADER}\n#line 1 \"{}\"\n{}\n#line 1 \"instantiations\"\n",
        module.file_name(),
        module.body()
    );
    for k in kernels {
        src.push_str(&k.instantiation());
        src.push('\n');
    }
    src
}

/// What the backend compiles as one NVRTC program: a whole module, or one kernel of a
/// [per-kernel](Module::per_kernel) module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// Every kernel of the module.
    Module(Module),
    /// One kernel.
    Kernel(Kernel),
}

impl Unit {
    /// The program's name in messages.
    pub fn name(self) -> String {
        match self {
            Unit::Module(m) => m.file_name().to_string(),
            Unit::Kernel(k) => format!("{}:{}", k.module().file_name(), k.name()),
        }
    }

    /// The program's source.
    pub fn source(self) -> String {
        match self {
            Unit::Module(m) => m.source(),
            Unit::Kernel(k) => program(k.module(), &[k]),
        }
    }
}

impl std::fmt::Display for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.file_name())
    }
}

/// A storage type a kernel reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Float {
    /// f32.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl Float {
    /// Every type.
    pub const ALL: [Float; 3] = [Float::F32, Float::F16, Float::BF16];

    /// The kernel-name suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            Float::F32 => "f32",
            Float::F16 => "f16",
            Float::BF16 => "bf16",
        }
    }

    /// The CUDA type (common.cuh's storage types).
    fn ctype(self) -> &'static str {
        match self {
            Float::F32 => "float",
            Float::F16 => "half_t",
            Float::BF16 => "bf16_t",
        }
    }

    /// The type of a dtype (`None` for a dtype sd-cuda has no kernels for).
    pub fn of(dtype: DType) -> Option<Float> {
        match dtype {
            DType::F32 => Some(Float::F32),
            DType::F16 => Some(Float::F16),
            DType::BF16 => Some(Float::BF16),
            _ => None,
        }
    }

    /// The dtype.
    pub fn dtype(self) -> DType {
        match self {
            Float::F32 => DType::F32,
            Float::F16 => DType::F16,
            Float::BF16 => DType::BF16,
        }
    }

    /// The half-precision type, for the tensor-core kernels.
    pub fn half(self) -> Option<Half> {
        match self {
            Float::F32 => None,
            Float::F16 => Some(Half::F16),
            Float::BF16 => Some(Half::BF16),
        }
    }

    /// The bit width, for the kernels that only move data.
    pub fn bits(self) -> Bits {
        match self {
            Float::F32 => Bits::B32,
            Float::F16 | Float::BF16 => Bits::B16,
        }
    }
}

/// A half-precision type (the tensor-core kernels' inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Half {
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl Half {
    /// Both types.
    pub const ALL: [Half; 2] = [Half::F16, Half::BF16];

    fn float(self) -> Float {
        match self {
            Half::F16 => Float::F16,
            Half::BF16 => Float::BF16,
        }
    }

    fn suffix(self) -> &'static str {
        self.float().suffix()
    }
}

/// An element size, for kernels that copy bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bits {
    /// 16-bit elements (f16, bf16).
    B16,
    /// 32-bit elements (f32).
    B32,
}

impl Bits {
    /// Both sizes.
    pub const ALL: [Bits; 2] = [Bits::B16, Bits::B32];

    fn suffix(self) -> &'static str {
        match self {
            Bits::B16 => "b16",
            Bits::B32 => "b32",
        }
    }

    fn ctype(self) -> &'static str {
        match self {
            Bits::B16 => "u16",
            Bits::B32 => "u32",
        }
    }
}

/// The convolution kernel sizes with their own compiled kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Taps {
    /// 1 x 1.
    K1,
    /// 3 x 3.
    K3,
    /// Any other size (read at run time).
    Any,
}

impl Taps {
    /// Every variant.
    pub const ALL: [Taps; 3] = [Taps::K1, Taps::K3, Taps::Any];

    /// The variant for a `kh x kw` kernel.
    pub fn of(kh: usize, kw: usize) -> Taps {
        match (kh, kw) {
            (1, 1) => Taps::K1,
            (3, 3) => Taps::K3,
            _ => Taps::Any,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Taps::K1 => "k1",
            Taps::K3 => "k3",
            Taps::Any => "kn",
        }
    }

    /// The template's (KH, KW): 0 reads the size at run time.
    fn template(self) -> (u32, u32) {
        match self {
            Taps::K1 => (1, 1),
            Taps::K3 => (3, 3),
            Taps::Any => (0, 0),
        }
    }
}

/// The head sizes the attention kernels are compiled for; a head of size `d` runs in the
/// smallest that holds it, zero-padded (40 in 48, so that it stays on the tensor cores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HeadDim {
    /// Up to 32.
    D32,
    /// Up to 48 (SD 1.x's 40).
    D48,
    /// Up to 64 (SD 2.x, SDXL).
    D64,
    /// Up to 80 (SD 1.x).
    D80,
    /// Up to 128.
    D128,
    /// Up to 160 (SD 1.x).
    D160,
}

impl HeadDim {
    /// Every bucket, smallest first.
    pub const ALL: [HeadDim; 6] = [
        HeadDim::D32,
        HeadDim::D48,
        HeadDim::D64,
        HeadDim::D80,
        HeadDim::D128,
        HeadDim::D160,
    ];

    /// The padded size.
    pub fn size(self) -> usize {
        match self {
            HeadDim::D32 => 32,
            HeadDim::D48 => 48,
            HeadDim::D64 => 64,
            HeadDim::D80 => 80,
            HeadDim::D128 => 128,
            HeadDim::D160 => 160,
        }
    }

    /// The smallest bucket holding `d`; `None` past 160.
    pub fn fitting(d: usize) -> Option<HeadDim> {
        Self::ALL.into_iter().find(|h| h.size() >= d)
    }
}

/// Launch geometry shared with the CUDA sources (each constant names its `#define`).
pub(crate) mod geometry {
    /// Threads per block of the one-dimensional kernels.
    pub const THREADS: u32 = 256;
    /// `NORM_THREADS`.
    pub const NORM_THREADS: u32 = 256;
    /// `TC_BM`, `TC_BN`, `TC_BK`, `TC_THREADS` of conv.cu.
    pub const CONV_TC_TILE: (usize, usize, usize) = (128, 128, 32);
    /// Threads of the tensor-core convolution.
    pub const CONV_TC_THREADS: u32 = 256;
    /// `F32_BM`, `F32_BN`, `F32_BK` of conv.cu.
    pub const CONV_F32_TILE: (usize, usize, usize) = (64, 64, 16);
    /// `F32_THREADS`.
    pub const CONV_F32_THREADS: u32 = 256;
    /// `ATT_BM`, `ATT_BN`, `ATT_THREADS` of attention.cu.
    pub const ATT_TC: (usize, usize, u32) = (64, 64, 128);
    /// `ATF_BM`, `ATF_BN`, `ATF_THREADS` of attention.cu.
    pub const ATT_F32: (usize, usize, u32) = (16, 32, 128);
}

/// Every entry point of the kernel modules, named by what it computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kernel {
    /// `cast_{from}_{to}` (from != to).
    Cast {
        /// Input type.
        from: Float,
        /// Output type.
        to: Float,
    },
    /// `permute_{bits}`: a gather through permuted strides.
    Permute(Bits),
    /// `copy2d_{bits}`: strided row blocks (slice, concat).
    Copy2d(Bits),
    /// `binary_{a}_{b}`: broadcast add / sub / mul, output in the promoted type.
    Binary {
        /// Left operand.
        a: Float,
        /// Right operand.
        b: Float,
    },
    /// `unary_{t}`: affine, SiLU, GELU (erf, tanh), quick GELU.
    Unary(Float),
    /// `bias_rows_{t}`: a bias added to every row, in place.
    BiasRows(Float),
    /// `softmax_last_{t}`.
    SoftmaxLast(Float),
    /// `geglu_{t}`.
    Geglu(Float),
    /// `group_norm_stats_{t}`: per-chunk statistics.
    GroupNormStats(Float),
    /// `group_norm_apply_{t}`: merge and normalise (optionally SiLU).
    GroupNormApply(Float),
    /// `layer_norm_{t}`.
    LayerNorm(Float),
    /// `upsample_nearest2x_{bits}`.
    UpsampleNearest2x(Bits),
    /// `conv_tc_{t}_{taps}`: tensor-core implicit GEMM.
    ConvTensorCore {
        /// Storage type.
        dtype: Half,
        /// Kernel size.
        taps: Taps,
    },
    /// `conv_f32_{taps}`: SIMT implicit GEMM.
    ConvF32(Taps),
    /// `conv_finalize_{t}`: split-K reduction and bias.
    ConvFinalize(Float),
    /// `attn_tc_{t}_d{hd}`: tensor-core flash attention.
    AttentionTensorCore {
        /// Storage type.
        dtype: Half,
        /// Padded head size.
        head: HeadDim,
    },
    /// `attn_f32_d{hd}`: SIMT flash attention.
    AttentionF32(HeadDim),
}

impl Kernel {
    /// The module that defines it.
    pub fn module(self) -> Module {
        match self {
            Kernel::Cast { .. } | Kernel::Permute(_) | Kernel::Copy2d(_) => Module::Data,
            Kernel::Binary { .. } | Kernel::Unary(_) | Kernel::BiasRows(_) => Module::Elementwise,
            Kernel::SoftmaxLast(_) | Kernel::Geglu(_) => Module::Activation,
            Kernel::GroupNormStats(_) | Kernel::GroupNormApply(_) | Kernel::LayerNorm(_) => {
                Module::Norm
            }
            Kernel::UpsampleNearest2x(_) => Module::Resample,
            Kernel::ConvTensorCore { .. } | Kernel::ConvF32(_) | Kernel::ConvFinalize(_) => {
                Module::Conv
            }
            Kernel::AttentionTensorCore { .. } | Kernel::AttentionF32(_) => Module::Attention,
        }
    }

    /// The `extern "C"` symbol.
    pub fn name(self) -> String {
        match self {
            Kernel::Cast { from, to } => format!("cast_{}_{}", from.suffix(), to.suffix()),
            Kernel::Permute(b) => format!("permute_{}", b.suffix()),
            Kernel::Copy2d(b) => format!("copy2d_{}", b.suffix()),
            Kernel::Binary { a, b } => format!("binary_{}_{}", a.suffix(), b.suffix()),
            Kernel::Unary(t) => format!("unary_{}", t.suffix()),
            Kernel::BiasRows(t) => format!("bias_rows_{}", t.suffix()),
            Kernel::SoftmaxLast(t) => format!("softmax_last_{}", t.suffix()),
            Kernel::Geglu(t) => format!("geglu_{}", t.suffix()),
            Kernel::GroupNormStats(t) => format!("group_norm_stats_{}", t.suffix()),
            Kernel::GroupNormApply(t) => format!("group_norm_apply_{}", t.suffix()),
            Kernel::LayerNorm(t) => format!("layer_norm_{}", t.suffix()),
            Kernel::UpsampleNearest2x(b) => format!("upsample_nearest2x_{}", b.suffix()),
            Kernel::ConvTensorCore { dtype, taps } => {
                format!("conv_tc_{}_{}", dtype.suffix(), taps.suffix())
            }
            Kernel::ConvF32(taps) => format!("conv_f32_{}", taps.suffix()),
            Kernel::ConvFinalize(t) => format!("conv_finalize_{}", t.suffix()),
            Kernel::AttentionTensorCore { dtype, head } => {
                format!("attn_tc_{}_d{}", dtype.suffix(), head.size())
            }
            Kernel::AttentionF32(head) => format!("attn_f32_d{}", head.size()),
        }
    }

    /// The macro invocation in its module that defines it (`CAST(f32, float, f16, half_t)`).
    pub fn instantiation(self) -> String {
        match self {
            Kernel::Cast { from, to } => format!(
                "CAST({}, {}, {}, {})",
                from.suffix(),
                from.ctype(),
                to.suffix(),
                to.ctype()
            ),
            Kernel::Permute(b) => format!("PERMUTE({}, {})", b.suffix(), b.ctype()),
            Kernel::Copy2d(b) => format!("COPY2D({}, {})", b.suffix(), b.ctype()),
            Kernel::Binary { a, b } => {
                let out = if a == b { a } else { Float::F32 };
                format!(
                    "BINARY({}, {}, {}, {}, {})",
                    a.suffix(),
                    a.ctype(),
                    b.suffix(),
                    b.ctype(),
                    out.ctype()
                )
            }
            Kernel::Unary(t) => format!("UNARY({}, {})", t.suffix(), t.ctype()),
            Kernel::BiasRows(t) => format!("BIAS_ROWS({}, {})", t.suffix(), t.ctype()),
            Kernel::SoftmaxLast(t) => format!("SOFTMAX_LAST({}, {})", t.suffix(), t.ctype()),
            Kernel::Geglu(t) => format!("GEGLU({}, {})", t.suffix(), t.ctype()),
            Kernel::GroupNormStats(t) => format!("GROUP_NORM_STATS({}, {})", t.suffix(), t.ctype()),
            Kernel::GroupNormApply(t) => format!("GROUP_NORM_APPLY({}, {})", t.suffix(), t.ctype()),
            Kernel::LayerNorm(t) => format!("LAYER_NORM({}, {})", t.suffix(), t.ctype()),
            Kernel::UpsampleNearest2x(b) => format!("UPSAMPLE({}, {})", b.suffix(), b.ctype()),
            Kernel::ConvTensorCore { dtype, taps } => {
                let (kh, kw) = taps.template();
                let t = dtype.float();
                format!(
                    "CONV_TC({}, {}, {}, {kh}, {kw})",
                    t.suffix(),
                    t.ctype(),
                    taps.suffix()
                )
            }
            Kernel::ConvF32(taps) => {
                let (kh, kw) = taps.template();
                format!("CONV_F32({}, {kh}, {kw})", taps.suffix())
            }
            Kernel::ConvFinalize(t) => format!("CONV_FINALIZE({}, {})", t.suffix(), t.ctype()),
            Kernel::AttentionTensorCore { dtype, head } => {
                let t = dtype.float();
                format!("ATTN_TC({}, {}, {})", t.suffix(), t.ctype(), head.size())
            }
            Kernel::AttentionF32(head) => format!("ATTN_F32({})", head.size()),
        }
    }

    /// The program the backend compiles it in.
    pub fn unit(self) -> Unit {
        let m = self.module();
        if m.per_kernel() {
            Unit::Kernel(self)
        } else {
            Unit::Module(m)
        }
    }

    /// The dynamic shared memory a launch needs, in bytes (the attention kernels'; the
    /// others use static shared memory only). Mirrors the layout in attention.cu.
    pub fn dynamic_shared_bytes(self) -> u32 {
        match self {
            Kernel::AttentionTensorCore { head, .. } => {
                let ld = head.size() + 8;
                // Q, K and V tiles of 64 rows of 16-bit values.
                (3 * 64 * ld * 2) as u32
            }
            Kernel::AttentionF32(head) => {
                let hd = head.size();
                // Q [16][hd+1], K [32][hd+1], V [32][hd], P [16][33] floats.
                ((16 * (hd + 1) + 32 * (hd + 1) + 32 * hd + 16 * 33) * 4) as u32
            }
            _ => 0,
        }
    }

    /// Every kernel the modules define.
    pub fn all() -> Vec<Kernel> {
        let mut all = Vec::new();
        for from in Float::ALL {
            for to in Float::ALL {
                if from != to {
                    all.push(Kernel::Cast { from, to });
                }
                all.push(Kernel::Binary { a: from, b: to });
            }
        }
        for b in Bits::ALL {
            all.extend([
                Kernel::Permute(b),
                Kernel::Copy2d(b),
                Kernel::UpsampleNearest2x(b),
            ]);
        }
        for t in Float::ALL {
            all.extend([
                Kernel::Unary(t),
                Kernel::BiasRows(t),
                Kernel::SoftmaxLast(t),
                Kernel::Geglu(t),
                Kernel::GroupNormStats(t),
                Kernel::GroupNormApply(t),
                Kernel::LayerNorm(t),
                Kernel::ConvFinalize(t),
            ]);
        }
        for taps in Taps::ALL {
            all.push(Kernel::ConvF32(taps));
            for dtype in Half::ALL {
                all.push(Kernel::ConvTensorCore { dtype, taps });
            }
        }
        for head in HeadDim::ALL {
            all.push(Kernel::AttentionF32(head));
            for dtype in Half::ALL {
                all.push(Kernel::AttentionTensorCore { dtype, head });
            }
        }
        all
    }
}

/// What [`compile`] makes: machine code for a real architecture, or PTX for the driver to
/// finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// `--gpu-architecture=sm_XY`: a cubin (and its PTX).
    Cubin(Arch),
    /// `--gpu-architecture=compute_XY`: PTX only.
    Ptx(Arch),
}

impl Target {
    fn arch(self) -> Arch {
        match self {
            Target::Cubin(a) | Target::Ptx(a) => a,
        }
    }

    fn option(self) -> String {
        match self {
            Target::Cubin(a) => format!("--gpu-architecture=sm_{}", a.number()),
            Target::Ptx(a) => format!("--gpu-architecture=compute_{}", a.number()),
        }
    }
}

/// A compiled module.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The program's name (a module's file name).
    pub program: String,
    /// What it was compiled for.
    pub target: Target,
    /// The options NVRTC got.
    pub options: Vec<String>,
    /// The PTX text.
    pub ptx: String,
    /// The cubin, for [`Target::Cubin`].
    pub cubin: Option<Vec<u8>>,
    /// The compiler's log (with `verbose`, ptxas's per-kernel resource lines).
    pub log: String,
}

/// One kernel's resources, as ptxas reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// The kernel.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes spilled to local memory (stores).
    pub spill_stores: u32,
    /// Bytes reloaded from spills.
    pub spill_loads: u32,
    /// Static shared memory in bytes.
    pub shared_bytes: u32,
}

impl Compiled {
    /// The kernels the PTX defines (`.entry` names).
    pub fn entries(&self) -> Vec<String> {
        self.ptx
            .lines()
            .filter_map(|l| {
                let rest = l.trim_start().strip_prefix(".visible .entry ")?;
                Some(rest.split('(').next()?.trim().to_string())
            })
            .collect()
    }

    /// Registers, spills and shared memory per kernel, parsed from a verbose log (empty for
    /// a PTX-only compile or without `verbose`).
    pub fn resources(&self) -> Vec<Resources> {
        parse_ptxas_log(&self.log)
    }
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let end = line.find(unit)?;
    line[..end].split_whitespace().last()?.parse().ok()
}

/// Parses ptxas's `-v` lines: "Compiling entry function 'NAME'", "N bytes spill stores, M
/// bytes spill loads", "Used R registers, ... S bytes smem".
pub(crate) fn parse_ptxas_log(log: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    for line in log.lines() {
        if let Some(pos) = line.find("Compiling entry function '") {
            let rest = &line[pos + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or_default();
            out.push(Resources {
                name: name.to_string(),
                ..Resources::default()
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if line.contains("spill stores") {
            cur.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            cur.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            cur.registers = number_before(line, "registers").unwrap_or(0);
            cur.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Destroys an NVRTC program when dropped.
struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by create_program and is destroyed once, here.
        // A failure to free leaks a little host memory; nothing to report it to.
        let _ = unsafe { cudarc::nvrtc::result::destroy_program(self.0) };
    }
}

/// The options every module is compiled with: C++17, functions default to device code
/// (`-default-device`), accurate math (no `--use_fast_math`: the f32 kernels must match the
/// CPU to 1e-4).
pub fn options(target: Target, verbose: bool) -> Vec<String> {
    let mut o = vec![
        target.option(),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    if verbose && matches!(target, Target::Cubin(_)) {
        o.push("--ptxas-options=-v".to_string());
    }
    o
}

/// Compiles `module` for `target` with NVRTC. Needs NVRTC only (no driver, no GPU).
/// `verbose` asks ptxas for per-kernel resource lines in the log.
///
/// # Errors
/// [`CudaError::NvrtcNotFound`] / [`CudaError::Version`] without a usable NVRTC;
/// [`CudaError::Compile`] with the log when the source does not compile.
pub fn compile(module: Module, target: Target, verbose: bool) -> Result<Compiled> {
    compile_source(module.file_name(), &module.source(), target, verbose)
}

/// Compiles one [`Unit`] (what the backend loads) for `target`.
///
/// # Errors
/// As [`compile`].
pub fn compile_unit(unit: Unit, target: Target, verbose: bool) -> Result<Compiled> {
    compile_source(&unit.name(), &unit.source(), target, verbose)
}

/// Compiles CUDA C `source`, named `program` in messages, with the [`options`] the modules
/// get (for checks that compile more than a module, such as the layout of the parameter
/// structs).
///
/// # Errors
/// As [`compile`].
pub fn compile_source(
    program: &str,
    source: &str,
    target: Target,
    verbose: bool,
) -> Result<Compiled> {
    use cudarc::nvrtc::{result, sys};
    loader::nvrtc_version()?;
    let arch = target.arch();
    let fail = |message: String, log: String| CudaError::Compile {
        program: program.to_string(),
        arch,
        message,
        log,
    };
    let src = CString::new(source)
        .map_err(|_| fail("the source holds a NUL byte".into(), String::new()))?;
    let name = CString::new(program)
        .map_err(|_| fail("the name holds a NUL byte".into(), String::new()))?;
    let prog = Program(
        result::create_program(&src, Some(&name))
            .map_err(|e| fail(format!("{e:?}"), String::new()))?,
    );
    let opts = options(target, verbose);
    // SAFETY: `prog` is a live program; the options are NUL-free strings.
    let status = unsafe { result::compile_program(prog.0, &opts) };
    // SAFETY: `prog` is live.
    let log = unsafe { result::get_program_log(prog.0) }
        .map(|l| c_chars_to_string(&l))
        .unwrap_or_default();
    status.map_err(|e| fail(format!("{e:?}"), log.clone()))?;
    // SAFETY: `prog` compiled successfully.
    let ptx = unsafe { result::get_ptx(prog.0) }
        .map(|p| c_chars_to_string(&p))
        .map_err(|e| fail(format!("nvrtcGetPTX: {e:?}"), log.clone()))?;
    let cubin = match target {
        Target::Ptx(_) => None,
        Target::Cubin(_) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully for a real architecture.
            unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
                .result()
                .map_err(|e| fail(format!("nvrtcGetCUBINSize: {e:?}"), log.clone()))?;
            let mut bin = vec![0u8; size];
            // SAFETY: `bin` has the `size` bytes nvrtcGetCUBINSize asked for.
            unsafe { sys::nvrtcGetCUBIN(prog.0, bin.as_mut_ptr().cast::<c_char>()) }
                .result()
                .map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}"), log.clone()))?;
            Some(bin)
        }
    };
    Ok(Compiled {
        program: program.to_string(),
        target,
        options: opts,
        ptx,
        cubin,
        log,
    })
}

/// The real architectures this NVRTC can generate code for (e.g. 75, 80, 86, ..., 90, ...).
///
/// # Errors
/// [`CudaError::NvrtcNotFound`] / [`CudaError::Version`] without a usable NVRTC.
pub fn supported_archs() -> Result<Vec<u32>> {
    use cudarc::nvrtc::sys;
    loader::nvrtc_version()?;
    let mut n: c_int = 0;
    // SAFETY: NVRTC is loaded (checked above); writes one int.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .map_err(|e| CudaError::Nvrtc {
            call: "nvrtcGetNumSupportedArchs",
            message: format!("{e:?}"),
        })?;
    let mut archs = vec![0 as c_int; usize::try_from(n).unwrap_or(0)];
    if !archs.is_empty() {
        // SAFETY: `archs` has the `n` entries NVRTC reported.
        unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(|e| CudaError::Nvrtc {
                call: "nvrtcGetSupportedArchs",
                message: format!("{e:?}"),
            })?;
    }
    Ok(archs
        .into_iter()
        .filter_map(|a| u32::try_from(a).ok())
        .collect())
}

/// What is loaded into a device: a cubin, or PTX the driver compiles.
#[derive(Debug)]
pub(crate) enum Image {
    Cubin(Vec<u8>),
    Ptx(String),
}

/// The target for a device: its own architecture when NVRTC knows it, else PTX for the
/// newest architecture NVRTC knows that the device can run.
pub(crate) fn target_for(arch: Arch) -> Result<Target> {
    let supported = supported_archs()?;
    if supported.contains(&arch.number()) {
        return Ok(Target::Cubin(arch));
    }
    supported
        .iter()
        .copied()
        .filter(|&a| a <= arch.number() && a >= Arch::SM80.number())
        .max()
        .map(|a| {
            Target::Ptx(Arch {
                major: a / 10,
                minor: a % 10,
            })
        })
        .ok_or_else(|| {
            CudaError::Unsupported(format!(
                "this NVRTC generates code for {supported:?}, none of them usable on {arch}"
            ))
        })
}

type Slot = Arc<Mutex<Option<Arc<Image>>>>;

/// The compiled image of `unit` for a device of `arch`: compiled on first request, then
/// shared by every backend of the process on a device of that architecture. Different
/// units compile concurrently; two requests for one unit compile it once.
///
/// # Errors
/// As [`compile`] (an error is not cached: the next request tries again).
pub(crate) fn image(unit: Unit, arch: Arch) -> Result<Arc<Image>> {
    static CACHE: OnceLock<Mutex<HashMap<(Arch, Unit), Slot>>> = OnceLock::new();
    let slot = {
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = cache.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry((arch, unit)).or_default())
    };
    let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(img) = slot.as_ref() {
        return Ok(Arc::clone(img));
    }
    let compiled = compile_unit(unit, target_for(arch)?, false)?;
    let img = Arc::new(match compiled.cubin {
        Some(bin) => Image::Cubin(bin),
        None => Image::Ptx(compiled.ptx),
    });
    *slot = Some(Arc::clone(&img));
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let all = Kernel::all();
        let mut names: Vec<String> = all.iter().map(|k| k.name()).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len());
        assert_eq!(n, 6 + 9 + 6 + 24 + 9 + 18);
    }

    #[test]
    fn head_buckets() {
        assert_eq!(HeadDim::fitting(40), Some(HeadDim::D48));
        assert_eq!(HeadDim::fitting(64), Some(HeadDim::D64));
        assert_eq!(HeadDim::fitting(80), Some(HeadDim::D80));
        assert_eq!(HeadDim::fitting(160), Some(HeadDim::D160));
        assert_eq!(HeadDim::fitting(1), Some(HeadDim::D32));
        assert_eq!(HeadDim::fitting(161), None);
        for h in HeadDim::ALL {
            assert_eq!(h.size() % 16, 0, "the tensor-core kernel steps k by 16");
        }
    }

    #[test]
    fn attention_shared_memory_fits_an_h100() {
        for k in Kernel::all() {
            assert!(k.dynamic_shared_bytes() <= 227 * 1024, "{k:?}");
        }
        assert_eq!(
            Kernel::AttentionTensorCore {
                dtype: Half::F16,
                head: HeadDim::D160
            }
            .dynamic_shared_bytes(),
            64_512
        );
    }

    #[test]
    fn ptxas_log_parsing() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'conv_tc_f16_k1' for 'sm_90'\n\
            ptxas info    : Function properties for conv_tc_f16_k1\n\
            ptxas         .     0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
            ptxas info    : Used 123 registers, used 1 barriers, 40960 bytes smem\n\
            ptxas info    : Compiling entry function 'k2' for 'sm_90'\n\
            ptxas info    : Used 16 registers, used 0 barriers, 376 bytes cmem[0]\n";
        let r = parse_ptxas_log(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            Resources {
                name: "conv_tc_f16_k1".into(),
                registers: 123,
                spill_stores: 8,
                spill_loads: 4,
                shared_bytes: 40960
            }
        );
        assert_eq!(r[1].registers, 16);
        assert_eq!(r[1].shared_bytes, 0);
    }
}
