//! The CPU backend's own GEMM: BLIS-style blocking (Goto & van de Geijn, 2008) around
//! register-blocked microkernels ([`kernels`]), with operands packed on the fly or once at
//! load ([`pack`]).
//!
//! `C [M, N] (+)= A [M, K] B [K, N]` runs as tasks over blocks of rows and columns of C on
//! rayon's pool; each task walks `K` in blocks of [`KC`], packs what is not packed already
//! and calls the kernel for every `MR x NR` tile. A convolution is the product of its
//! weights (`[O, C kh kw]`, packed once) with its unfolded input, packed straight from the
//! image, so no im2col buffer exists (implicit GEMM); or, with AVX-512 and whole blocks of
//! channels, the transposed product read straight from a channel-blocked copy of the image
//! ([`blocked`]). A linear layer is the product of its input with its packed, transposed
//! weight.
//!
//! Every element of C sums its `K` terms in the same order (blocks of `KC`, then `k` within
//! a block) however the work is split, so results do not depend on the number of threads.

pub(crate) mod blocked;
pub(crate) mod kernels;
pub(crate) mod pack;

use rayon::prelude::*;

use super::math::dispatch;
use kernels::Init;
use pack::{ConvGeom, Strided, Windows, pack_a, pack_b, pack_conv_b, pack_windows_b, pair_panel};

/// The `K` block: a B micro-panel (`KC x NR`) stays in L1 while it meets every A micro-panel
/// of a row block.
pub(crate) const KC: usize = 192;
/// The most rows of C one task covers: its A block (`MC x KC`) stays in L2.
const MC: usize = 480;
/// The bytes of a packed B from which a product with fewer rows than columns splits its
/// columns rather than its rows between tasks (see [`blocks`]): about what stays in a
/// large last-level cache beside the activations.
const STREAMED_B_BYTES: usize = 8 << 20;
/// The bytes of C one task covers at most when B is packed on the fly: the block is
/// revisited for every `KC` block of `K`, so it should stay in L2.
const C_BLOCK_BYTES: usize = 384 << 10;

/// Which microkernel family runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuIsa {
    /// AVX-512F: 12 x 32 tiles.
    Avx512,
    /// AVX2 and FMA: 6 x 16 tiles.
    Avx2,
    /// Plain Rust for any CPU: 6 x 16 tiles.
    Portable,
}

impl CpuIsa {
    /// The best this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return CpuIsa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return CpuIsa::Avx2;
            }
        }
        CpuIsa::Portable
    }

    /// Whether this CPU can run it.
    pub fn is_supported(self) -> bool {
        match self {
            CpuIsa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            CpuIsa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            CpuIsa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Tile rows.
    pub(crate) fn mr(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            CpuIsa::Avx512 => kernels::AVX512_MR,
            _ => kernels::PORTABLE_MR,
        }
    }

    /// Tile columns.
    pub(crate) fn nr(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            CpuIsa::Avx512 => kernels::AVX512_NR,
            _ => kernels::PORTABLE_NR,
        }
    }

    /// One tile.
    ///
    /// # Safety
    /// As the kernels': `a` and `b` hold `kc * mr` and `kc * nr` values, `c` addresses
    /// `rows x cols` values `ldc` apart, the `Init` pointer enough values; the ISA is
    /// supported (checked when the backend was made).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn tile(
        self,
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        init: Init,
    ) {
        debug_assert!(a.len() >= kc * self.mr() && b.len() >= kc * self.nr());
        // SAFETY: forwarded from the caller.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                CpuIsa::Avx512 => {
                    kernels::avx512_f32(kc, a.as_ptr(), b.as_ptr(), c, ldc, rows, cols, init)
                }
                #[cfg(target_arch = "x86_64")]
                CpuIsa::Avx2 => kernels::avx2_f32(kc, a, b, c, ldc, rows, cols, init),
                _ => kernels::portable_f32(kc, a, b, c, ldc, rows, cols, init),
            }
        }
    }
}

/// The number type the CPU backend's products multiply in (they accumulate in f32 either
/// way); see [`CpuBackend::with_precision`](crate::CpuBackend::with_precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CpuPrecision {
    /// f32 operands.
    #[default]
    F32,
    /// Operands rounded to bfloat16 (AVX512-BF16's `vdpbf16ps`).
    Bf16,
}

impl CpuPrecision {
    /// The bytes of one packed operand value.
    fn bytes(self) -> usize {
        match self {
            CpuPrecision::F32 => 4,
            CpuPrecision::Bf16 => 2,
        }
    }

    /// Whether this CPU has AVX-512F and AVX512-BF16.
    pub fn bf16_supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Bf16 where the CPU has it, else f32.
    pub fn fastest() -> Self {
        if CpuIsa::detect() == CpuIsa::Avx512 && Self::bf16_supported() {
            CpuPrecision::Bf16
        } else {
            CpuPrecision::F32
        }
    }
}

/// Operand panels packed once, in the product's precision: f32 values, or bf16 pairs
/// ([`pack::pair_packing`]); or f32 panels stored in half precision (weights loaded in
/// f16 or bf16 for an f32 product), widened block by block as the product reads them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Panels<'a> {
    /// f32 panels.
    F32(&'a [f32]),
    /// bf16 pairs.
    Bf16(&'a [u32]),
    /// f32 panels stored as f16.
    HalfF16(&'a [half::f16]),
    /// f32 panels stored as bf16.
    HalfBf16(&'a [half::bf16]),
}

/// Where A comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ASource<'a> {
    /// Packed once ([`pack::prepack_rows`] with this ISA's `mr`, paired for bf16), with
    /// panels of `k_stride >= k` columns of which the product reads the first `k` (a block
    /// of keys of an attention head packed whole); usually `k_stride == k`.
    Packed(Panels<'a>, usize),
    /// A strided matrix, packed on the fly.
    Strided(Strided<'a>),
    /// A direct convolution's channel-blocked image, read where it lies (AVX-512 only;
    /// `K` a multiple of [`blocked::CB`]).
    Rows(blocked::ConvRows<'a>),
}

/// Where B comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BSource<'a> {
    /// Packed once ([`pack::prepack_cols`] with this ISA's `nr`, paired for bf16).
    Packed(Panels<'a>),
    /// A strided matrix, packed on the fly.
    Strided(Strided<'a>),
    /// A convolution's unfolded input image `[C, H, W]`, packed on the fly.
    Conv(&'a [f32], ConvGeom),
    /// Windows of one buffer as rows or columns, packed on the fly.
    Windows(Windows<'a>),
}

/// What C starts from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start<'a> {
    /// Zero.
    Zero,
    /// Its current values (`C += A B`).
    Accumulate,
    /// `bias[row]` (per output channel of a convolution).
    RowBias(&'a [f32]),
    /// `bias[col]` (per output feature of a linear layer).
    ColBias(&'a [f32]),
}

/// A product to run: `C [m, n]` (row stride `ldc`) from `a` and `b` over `k`, in
/// `precision` (packed sources must be packed in it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Product<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: ASource<'a>,
    pub b: BSource<'a>,
    pub start: Start<'a>,
    pub precision: CpuPrecision,
}

/// A raw pointer to an output that tasks share; each task writes a disjoint block (of C in
/// [`run`], of the output in [`blocked::channels_out`]).
#[derive(Clone, Copy)]
struct CPtr(*mut f32);
// SAFETY: tasks write disjoint blocks of the output (see `run` and `channels_out`), and it
// outlives them (both return only after every task finished).
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

impl CPtr {
    /// Element `i` (a method, so that closures capture the shared pointer, not its field).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// A task: rows `m0..m1` and columns `n0..n1` of C.
#[derive(Debug, Clone, Copy)]
struct Block {
    m0: usize,
    m1: usize,
    n0: usize,
    n1: usize,
}

/// Splits `len` into about `parts` pieces, each a multiple of `unit` but the last.
fn split(len: usize, parts: usize, unit: usize) -> Vec<(usize, usize)> {
    let parts = parts.clamp(1, len.div_ceil(unit).max(1));
    let step = len.div_ceil(parts).div_ceil(unit) * unit;
    (0..len)
        .step_by(step.max(unit))
        .map(|s| (s, (s + step).min(len)))
        .collect()
}

/// The blocks of C for `threads` threads: rows in blocks of at most [`MC`]; then the
/// dimension whose operand is packed on the fly is split further (splitting the other would
/// pack the same data twice) until there are a few tasks per thread.
fn blocks(isa: CpuIsa, p: &Product<'_>, threads: usize) -> Vec<Block> {
    let (mr, nr) = (isa.mr(), isa.nr());
    let want = if threads > 1 { 4 * threads } else { 1 };
    let row_blocks = p.m.div_ceil(MC);
    let b_on_the_fly = !matches!(p.b, BSource::Packed(_));
    let a_on_the_fly = matches!(p.a, ASource::Strided(_));
    let (mut rows, mut cols) = (row_blocks, 1);
    // Splitting rows makes every task read all of B, splitting columns makes every task
    // pack its own copy of A. With A packed on the fly and B packed once (a linear layer),
    // rows split, unless B is the larger and too large to stay in cache: then every task
    // streaming the whole weight from memory made the product wait on memory (a GEGLU
    // weight against 128 rows ran at 55-60% of the FMA roof, at 75-80% split by columns).
    let b_streams = p.n > p.m && p.n * p.k * p.precision.bytes() >= STREAMED_B_BYTES;
    if a_on_the_fly && !b_on_the_fly && !b_streams {
        rows = rows.max(want.min(p.m.div_ceil(mr)));
    } else {
        cols = want.div_ceil(rows).min(p.n.div_ceil(nr));
        // Columns for the C block to stay in L2 (splitting them costs no packing when A is
        // packed once).
        let block_rows = p.m.div_ceil(rows).max(1);
        let max_cols = (C_BLOCK_BYTES / (4 * block_rows)).max(nr);
        cols = cols
            .max(p.n.div_ceil(max_cols))
            .min(p.n.div_ceil(nr).max(1));
    }
    // Still too few tasks (a short dimension): split the other one too.
    if rows * cols < want {
        if b_on_the_fly || !a_on_the_fly {
            rows = rows.max(want.div_ceil(cols).min(p.m.div_ceil(mr)));
        } else {
            cols = cols.max(want.div_ceil(rows).min(p.n.div_ceil(nr)));
        }
    }
    // Neither operand packed on the fly (a direct convolution): rows split for free, so a
    // few more make the count a multiple of the threads, and no thread is left to run the
    // last task alone (9 tasks on 2 threads take 5 rounds of work for 4.5).
    if threads > 1 && !a_on_the_fly && !b_on_the_fly {
        let max_rows = p.m.div_ceil(mr);
        while !(rows * cols).is_multiple_of(threads) && rows < max_rows {
            rows += 1;
        }
    }
    let mut out = Vec::new();
    for &(m0, m1) in &split(p.m, rows, mr) {
        for &(n0, n1) in &split(p.n, cols, nr) {
            out.push(Block { m0, m1, n0, n1 });
        }
    }
    out
}

/// Runs the products (for instance one per image of a batch) on rayon's pool, or on this
/// thread if `threads == 1`.
///
/// # Safety
/// `c[i]` addresses `products[i].m` rows of `products[i].n` writable values `ldc` apart,
/// distinct for every product; the sources hold the matrices their shapes describe; packed
/// sources were packed for `isa` in the product's precision; `isa` (and, for bf16,
/// AVX512-BF16) is supported.
pub(crate) unsafe fn run(
    isa: CpuIsa,
    products: &[Product<'_>],
    c: &[*mut f32],
    ldc: usize,
    threads: usize,
) {
    let per_product = threads.div_ceil(products.len().max(1)).max(1);
    let tasks: Vec<(usize, Block)> = products
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            blocks(isa, p, if threads > 1 { per_product } else { 1 })
                .into_iter()
                .map(move |b| (i, b))
        })
        .collect();
    let cptrs: Vec<CPtr> = c.iter().map(|&p| CPtr(p)).collect();
    let work = |scratch: &mut Scratch, &(i, block): &(usize, Block)| {
        // SAFETY: forwarded from the caller; the blocks of one product are disjoint.
        unsafe { run_block(isa, &products[i], cptrs[i], ldc, block, scratch) }
    };
    if threads > 1 && tasks.len() > 1 {
        tasks.par_iter().for_each_init(Scratch::default, work);
    } else {
        let mut scratch = Scratch::default();
        tasks.iter().for_each(|t| work(&mut scratch, t));
    }
}

/// Packing buffers a thread reuses from one product to the next.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    a16: Vec<u32>,
    b16: Vec<u32>,
}

/// `p` on this thread, reusing `scratch`'s buffers (for the many small products of one
/// attention task).
///
/// # Safety
/// As [`run`], for one product.
pub(crate) unsafe fn run_serial(
    isa: CpuIsa,
    p: &Product<'_>,
    c: *mut f32,
    ldc: usize,
    scratch: &mut Scratch,
) {
    let block = Block {
        m0: 0,
        m1: p.m,
        n0: 0,
        n1: p.n,
    };
    // SAFETY: forwarded from the caller.
    unsafe { run_block(isa, p, CPtr(c), ldc, block, scratch) }
}

/// A tile's A or B panel in the product's precision.
#[derive(Clone, Copy)]
enum Panel<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u32]),
}

impl<'a> Panels<'a> {
    /// The panels from value (or pair) `at` on.
    pub(crate) fn skip(self, at: usize) -> Panels<'a> {
        match self {
            Panels::F32(p) => Panels::F32(&p[at..]),
            Panels::Bf16(p) => Panels::Bf16(&p[at..]),
            Panels::HalfF16(p) => Panels::HalfF16(&p[at..]),
            Panels::HalfBf16(p) => Panels::HalfBf16(&p[at..]),
        }
    }

    /// Whether the panels are stored in half precision for an f32 product.
    fn is_half(self) -> bool {
        matches!(self, Panels::HalfF16(_) | Panels::HalfBf16(_))
    }

    /// Values `at .. at + len` of half-precision panels widened into `dst`.
    fn widen(self, at: usize, len: usize, dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            Panels::HalfF16(p) => p[at..at + len].convert_to_f32_slice(&mut dst[..len]),
            Panels::HalfBf16(p) => p[at..at + len].convert_to_f32_slice(&mut dst[..len]),
            Panels::F32(p) => dst[..len].copy_from_slice(&p[at..at + len]),
            // Pairs are never widened: bf16 products read them as they are.
            Panels::Bf16(_) => {}
        }
    }

    /// Group `at` (in groups of `width`) of `len` groups, in f32 or paired (`at` and `len`
    /// then count pairs). Not for half-precision panels, which are widened first.
    fn panel(self, at: usize, len: usize) -> Panel<'a> {
        match self {
            Panels::F32(p) => Panel::F32(&p[at..at + len]),
            Panels::Bf16(p) => Panel::Bf16(&p[at..at + len]),
            Panels::HalfF16(_) | Panels::HalfBf16(_) => Panel::F32(&[]),
        }
    }
}

/// One task.
///
/// # Safety
/// As [`run`], for the block.
unsafe fn run_block(
    isa: CpuIsa,
    p: &Product<'_>,
    c: CPtr,
    ldc: usize,
    blk: Block,
    scratch: &mut Scratch,
) {
    let (mr, nr) = (isa.mr(), isa.nr());
    let bf16 = p.precision == CpuPrecision::Bf16;
    // Groups of K per step of the kernel: one value, or a pair.
    let per = if bf16 { 2 } else { 1 };
    // K values per block: KC in f32; twice that in bf16, whose pairs take the same bytes
    // (measured on the VAE's convolutions: 8-10% faster than KC).
    let kc_max = KC * per;
    let kc2_max = kc_max / 2;
    let rows = blk.m1 - blk.m0;
    let a_panels = rows.div_ceil(mr);
    // Half-precision packed operands are widened into the same buffers as operands packed
    // on the fly.
    let a_half = matches!(p.a, ASource::Packed(panels, _) if panels.is_half());
    let b_half = matches!(p.b, BSource::Packed(panels) if panels.is_half());
    let a_buffered = a_half || matches!(p.a, ASource::Strided(_));
    let b_buffered = b_half || !matches!(p.b, BSource::Packed(_));
    if a_buffered {
        scratch.a.resize(a_panels * kc_max * mr, 0.0);
        if bf16 {
            scratch.a16.resize(a_panels * kc2_max * mr, 0);
        }
    }
    if b_buffered {
        scratch.b.resize(kc_max * nr, 0.0);
        if bf16 {
            scratch.b16.resize(kc2_max * nr, 0);
        }
    }
    let Scratch {
        a: abuf,
        b: bbuf,
        a16,
        b16,
    } = scratch;
    let mut pc = 0;
    while pc < p.k {
        let kc = kc_max.min(p.k - pc);
        let (kg, pg) = (kc.div_ceil(per), pc / per);
        match p.a {
            ASource::Strided(a) => {
                for (q, dst) in abuf
                    .chunks_exact_mut(kc_max * mr)
                    .take(a_panels)
                    .enumerate()
                {
                    let r0 = blk.m0 + q * mr;
                    dispatch!(isa, pack_a(a, r0, mr.min(blk.m1 - r0), pc, kc, mr, dst));
                    if bf16 {
                        dispatch!(isa, pair_panel(dst, kc, mr, &mut a16[q * kc2_max * mr..]));
                    }
                }
            }
            ASource::Packed(panels, stride) if a_half => {
                for (q, dst) in abuf
                    .chunks_exact_mut(kc_max * mr)
                    .take(a_panels)
                    .enumerate()
                {
                    let panel = blk.m0 / mr + q;
                    panels.widen((panel * stride + pc) * mr, kc * mr, dst);
                }
            }
            ASource::Packed(..) | ASource::Rows(_) => {}
        }
        let mut jr = blk.n0;
        while jr < blk.n1 {
            let cols = nr.min(blk.n1 - jr);
            if b_buffered {
                // Compiled for the widest vectors too: the packing copies are short runs.
                match p.b {
                    BSource::Strided(b) => {
                        dispatch!(isa, pack_b(b, pc, kc, jr, cols, nr, bbuf));
                    }
                    BSource::Conv(x, g) => {
                        dispatch!(isa, pack_conv_b(x, &g, pc, kc, jr, cols, nr, bbuf));
                    }
                    BSource::Windows(b) => {
                        dispatch!(isa, pack_windows_b(b, pc, kc, jr, cols, nr, bbuf));
                    }
                    BSource::Packed(panels) => {
                        panels.widen(((jr / nr) * p.k + pc) * nr, kc * nr, bbuf);
                    }
                }
                if bf16 {
                    dispatch!(isa, pair_panel(bbuf, kc, nr, b16));
                }
            }
            let bpanel = match p.b {
                BSource::Packed(panels) if !b_half => {
                    panels.panel(((jr / nr) * p.k.div_ceil(per) + pg) * nr, kg * nr)
                }
                _ if bf16 => Panel::Bf16(&b16[..kg * nr]),
                _ => Panel::F32(&bbuf[..kc * nr]),
            };
            let mut ir = blk.m0;
            while ir < blk.m1 {
                let tile_rows = mr.min(blk.m1 - ir);
                let init = match (pc, p.start) {
                    (0, Start::Zero) => Init::Zero,
                    (0, Start::RowBias(bias)) => Init::Row(bias[ir..].as_ptr()),
                    (0, Start::ColBias(bias)) => Init::Col(bias[jr..].as_ptr()),
                    _ => Init::Load,
                };
                let cp = c.at(ir * ldc + jr);
                #[cfg(target_arch = "x86_64")]
                if let ASource::Rows(a) = p.a {
                    // SAFETY: as below; rows past the tile's read its last pixel again
                    // (never stored); the offsets address whole blocks of the image (made
                    // with it), and K blocks are whole channel blocks.
                    unsafe {
                        direct_tile(
                            a,
                            ir,
                            blk.m1 - 1,
                            pc,
                            kc,
                            bpanel,
                            cp,
                            ldc,
                            tile_rows,
                            cols,
                            init,
                        )
                    };
                    ir += mr;
                    continue;
                }
                let apanel = match p.a {
                    ASource::Packed(panels, stride) if !a_half => {
                        panels.panel(((ir / mr) * stride.div_ceil(per) + pg) * mr, kg * mr)
                    }
                    _ => {
                        let q = (ir - blk.m0) / mr;
                        if bf16 {
                            Panel::Bf16(&a16[q * kc2_max * mr..q * kc2_max * mr + kg * mr])
                        } else {
                            Panel::F32(&abuf[q * kc_max * mr..q * kc_max * mr + kc * mr])
                        }
                    }
                };
                // SAFETY: the tile lies in this task's block of C (caller's contract); the
                // panels hold `kg` groups; the bias slices hold the tile's rows or columns;
                // a bf16 product runs only where AVX512-BF16 was checked.
                unsafe {
                    match (apanel, bpanel) {
                        (Panel::F32(a), Panel::F32(b)) => {
                            isa.tile(kc, a, b, cp, ldc, tile_rows, cols, init)
                        }
                        #[cfg(target_arch = "x86_64")]
                        (Panel::Bf16(a), Panel::Bf16(b)) => kernels::avx512_bf16(
                            kg,
                            a.as_ptr(),
                            b.as_ptr(),
                            cp,
                            ldc,
                            tile_rows,
                            cols,
                            init,
                        ),
                        // A product whose operands disagree on precision is a caller's bug;
                        // it computes nothing rather than reading out of bounds.
                        _ => debug_assert!(false, "operands of mixed precision"),
                    }
                }
                ir += mr;
            }
            jr += nr;
        }
        pc += kc;
    }
}

/// One tile of a direct convolution: rows `ir ..` of the product read from the blocked
/// image `a` (a row past `last` reads row `last`), K from `pc` for `kc`.
///
/// # Safety
/// As for the kernels: the CPU has AVX-512F (and AVX512-BF16 for pairs); `a` was made for
/// this product; `b`, `c` and `init` as [`run_block`] passes them.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn direct_tile(
    a: blocked::ConvRows<'_>,
    ir: usize,
    last: usize,
    pc: usize,
    kc: usize,
    b: Panel<'_>,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: Init,
) {
    use blocked::CB;
    let chunks = &a.chunks[pc / CB..(pc + kc).div_ceil(CB)];
    let at = |r: usize| a.data[a.pixels[(ir + r).min(last)]..].as_ptr();
    // SAFETY: forwarded from the caller.
    unsafe {
        match b {
            Panel::F32(b) => {
                let rows_at = std::array::from_fn(at);
                kernels::avx512_f32_rows(&rows_at, chunks, b.as_ptr(), c, ldc, rows, cols, init);
            }
            Panel::Bf16(b) => {
                let rows_at = std::array::from_fn(|r| at(r).cast::<u32>());
                kernels::avx512_bf16_rows(&rows_at, chunks, b.as_ptr(), c, ldc, rows, cols, init);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::pack::{prepack_cols, prepack_rows};
    use super::*;
    use crate::backend::Conv2dParams;
    use crate::cpu::PackedData;

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.618 + seed).sin()).collect()
    }

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|l| f64::from(a[i * k + l]) * f64::from(b[l * n + j]))
                    .sum();
            }
        }
        c
    }

    fn isas() -> Vec<CpuIsa> {
        [CpuIsa::Avx512, CpuIsa::Avx2, CpuIsa::Portable]
            .into_iter()
            .filter(|i| i.is_supported())
            .collect()
    }

    /// Every (kernels, precision) pair this CPU runs.
    fn modes() -> Vec<(CpuIsa, CpuPrecision)> {
        let mut out: Vec<_> = isas().into_iter().map(|i| (i, CpuPrecision::F32)).collect();
        if CpuIsa::Avx512.is_supported() && CpuPrecision::bf16_supported() {
            out.push((CpuIsa::Avx512, CpuPrecision::Bf16));
        }
        out
    }

    /// `x` as the product sees it: itself, or rounded to bf16.
    fn seen(x: &[f32], precision: CpuPrecision) -> Vec<f32> {
        match precision {
            CpuPrecision::F32 => x.to_vec(),
            CpuPrecision::Bf16 => x
                .iter()
                .map(|&v| f32::from_bits(pack::bf16_bits(v) << 16))
                .collect(),
        }
    }

    fn close(got: &[f32], want: &[f64], k: usize) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-5 * (k as f64).sqrt() * (1.0 + w.abs());
            assert!((f64::from(g) - w).abs() <= tol, "element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn every_source_and_start_matches_a_plain_product() {
        for (isa, precision) in modes() {
            for &(m, n, k) in &[
                (1, 1, 1),
                (13, 33, 5),
                (37, 70, 200),
                (25, 17, 400),
                // K over three bf16 blocks, the last of odd length.
                (9, 50, 777),
                (600, 40, 64),
            ] {
                let a = data(m * k, 0.1);
                let b = data(k * n, 0.2);
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                let bias_r = data(m, 0.3);
                let bias_c = data(n, 0.4);
                // Exact given the operands the kernels see (bf16-rounded for bf16).
                let want = naive(m, n, k, &seen(&a, precision), &seen(&b, precision));
                let pa = PackedData::in_precision(
                    prepack_rows(&a, m, k, isa.mr()),
                    k,
                    isa.mr(),
                    precision,
                );
                let pb = PackedData::in_precision(
                    prepack_cols(&bt, n, k, isa.nr()),
                    k,
                    isa.nr(),
                    precision,
                );
                let sa = Strided {
                    data: &a,
                    rs: k,
                    cs: 1,
                };
                let sb = Strided {
                    data: &b,
                    rs: n,
                    cs: 1,
                };
                let sbt = Strided {
                    data: &bt,
                    rs: 1,
                    cs: k,
                };
                let a_t: Vec<f32> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect();
                let sat = Strided {
                    data: &a_t,
                    rs: 1,
                    cs: m,
                };
                let sources_a = [
                    ASource::Packed(pa.panels(), k),
                    ASource::Strided(sa),
                    ASource::Strided(sat),
                ];
                // The rows of b, and the columns of bt, as windows at scattered distinct
                // starts (multiplying by a prime permutes 0..2k), NaN between them.
                let mut scattered = vec![f32::NAN; 3 * k * n + n];
                let row_starts: Vec<usize> = (0..k).map(|r| (r * 7919) % (2 * k) * n).collect();
                let col_starts: Vec<usize> = (0..n).map(|j| (j * 104_729) % (2 * n) * k).collect();
                let mut windows_t = vec![f32::NAN; 2 * n * k + k];
                for r in 0..k {
                    scattered[row_starts[r]..][..n].copy_from_slice(&b[r * n..][..n]);
                }
                for j in 0..n {
                    windows_t[col_starts[j]..][..k].copy_from_slice(&bt[j * k..][..k]);
                }
                let sources_b = [
                    BSource::Packed(pb.panels()),
                    BSource::Strided(sb),
                    BSource::Strided(sbt),
                    BSource::Windows(Windows {
                        data: &scattered,
                        starts: &row_starts,
                        transposed: false,
                    }),
                    BSource::Windows(Windows {
                        data: &windows_t,
                        starts: &col_starts,
                        transposed: true,
                    }),
                ];
                for a_src in sources_a {
                    for b_src in sources_b {
                        for threads in [1, 2, 3] {
                            for (start, add) in [
                                (Start::Zero, 0),
                                (Start::RowBias(&bias_r), 1),
                                (Start::ColBias(&bias_c), 2),
                                (Start::Accumulate, 3),
                            ] {
                                let mut c = vec![0.5_f32; m * n];
                                let p = Product {
                                    m,
                                    n,
                                    k,
                                    a: a_src,
                                    b: b_src,
                                    start,
                                    precision,
                                };
                                unsafe { run(isa, &[p], &[c.as_mut_ptr()], n, threads) };
                                let expect: Vec<f64> = (0..m * n)
                                    .map(|i| {
                                        want[i]
                                            + match add {
                                                1 => f64::from(bias_r[i / n]),
                                                2 => f64::from(bias_c[i % n]),
                                                3 => 0.5,
                                                _ => 0.0,
                                            }
                                    })
                                    .collect();
                                close(&c, &expect, k);
                            }
                        }
                    }
                }
            }
        }
    }

    fn naive_conv(x: &[f32], w: &[f32], g: &ConvGeom, o: usize) -> Vec<f64> {
        let (sh, sw) = g.params.stride;
        let (ph, pw) = g.params.padding;
        let mut out = vec![0.0; o * g.ho * g.wo];
        for oc in 0..o {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let mut s = 0.0;
                    for c in 0..g.c {
                        for ki in 0..g.kh {
                            for kj in 0..g.kw {
                                let iy = (oy * sh + ki) as isize - ph as isize;
                                let ix = (ox * sw + kj) as isize - pw as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w
                                {
                                    s += f64::from(x[(c * g.h + iy as usize) * g.w + ix as usize])
                                        * f64::from(w[((oc * g.c + c) * g.kh + ki) * g.kw + kj]);
                                }
                            }
                        }
                    }
                    out[(oc * g.ho + oy) * g.wo + ox] = s;
                }
            }
        }
        out
    }

    #[test]
    fn implicit_convolutions_match_a_direct_loop() {
        for (isa, precision) in modes() {
            for &(c, h, w, o, kh, stride, pad, up) in &[
                (3, 7, 9, 5, 3, 1, 1, 1),
                (4, 16, 16, 13, 3, 2, 1, 1),
                (8, 5, 40, 30, 3, 1, 1, 1),
                (6, 9, 9, 7, 1, 1, 0, 1),
                (5, 8, 8, 4, 3, 2, 0, 1),
                (2, 3, 70, 3, 3, 1, 2, 1),
                // Borders on both sides of 64-wide rows with K over several KC blocks that
                // start inside a channel; no padding; a 1x1 kernel on whole rows.
                (24, 6, 64, 14, 3, 1, 1, 1),
                (5, 4, 34, 7, 3, 1, 0, 1),
                (7, 3, 32, 9, 1, 1, 0, 1),
                // The image upsampled 2x on the fly, as every upsampler does.
                (3, 5, 7, 6, 3, 1, 1, 2),
                (4, 9, 20, 13, 3, 1, 1, 2),
                (2, 4, 4, 3, 1, 1, 0, 2),
            ] {
                let params = Conv2dParams::new(stride, pad);
                let (ho, wo) = params.output_size(h * up, w * up, kh, kh).unwrap();
                let g = ConvGeom {
                    c,
                    h,
                    w,
                    up,
                    kh,
                    kw: kh,
                    params,
                    ho,
                    wo,
                    images: 1,
                };
                let x = data(c * h * w, 0.5);
                let wt = data(o * c * kh * kh, 0.6);
                // The reference convolves the upsampled image itself.
                let big: Vec<f32> = (0..c * h * up * w * up)
                    .map(|i| {
                        let (ch, rest) = (i / (h * up * w * up), i % (h * up * w * up));
                        let (y, xx) = (rest / (w * up), rest % (w * up));
                        x[(ch * h + y / up) * w + xx / up]
                    })
                    .collect();
                let g_big = ConvGeom {
                    h: h * up,
                    w: w * up,
                    up: 1,
                    ..g
                };
                let want = naive_conv(&seen(&big, precision), &seen(&wt, precision), &g_big, o);
                let pa = PackedData::in_precision(
                    prepack_rows(&wt, o, g.k(), isa.mr()),
                    g.k(),
                    isa.mr(),
                    precision,
                );
                // The convolution of the images in `x` laid out as `g` says, on `threads`.
                let convolve = |x: &[f32], g: ConvGeom, threads: usize| {
                    let mut out = vec![f32::NAN; o * g.n()];
                    let p = Product {
                        m: o,
                        n: g.n(),
                        k: g.k(),
                        a: ASource::Packed(pa.panels(), g.k()),
                        b: BSource::Conv(x, g),
                        start: Start::Zero,
                        precision,
                    };
                    unsafe { run(isa, &[p], &[out.as_mut_ptr()], g.n(), threads) };
                    out
                };
                for threads in [1, 2] {
                    close(&convolve(&x, g, threads), &want, g.k());
                }
                // Three images side by side in the columns: the second and third are the
                // first scaled, so their outputs are the first's scaled (exact in binary).
                let g3 = ConvGeom { images: 3, ..g };
                let x3: Vec<f32> = [1.0, 2.0, -0.5]
                    .iter()
                    .flat_map(|&s| x.iter().map(move |v| v * s))
                    .collect();
                let out = convolve(&x3, g3, 2);
                let pixels = ho * wo;
                let want3: Vec<f64> = (0..o * g3.n())
                    .map(|i| {
                        let (row, col) = (i / g3.n(), i % g3.n());
                        let scale = [1.0, 2.0, -0.5][col / pixels];
                        scale * want[row * pixels + col % pixels]
                    })
                    .collect();
                close(&out, &want3, g.k());
            }
        }
    }

    #[test]
    fn few_rows_against_a_large_packed_b_split_columns() {
        let isa = CpuIsa::detect();
        // B of 8.8 MB in f32, over STREAMED_B_BYTES: every task should cover all rows.
        let (m, n, k) = (20, 2200, 1000);
        let a = data(m * k, 0.7);
        let b = data(k * n, 0.8);
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let pb = prepack_cols(&bt, n, k, isa.nr());
        let p = Product {
            m,
            n,
            k,
            a: ASource::Strided(Strided {
                data: &a,
                rs: k,
                cs: 1,
            }),
            b: BSource::Packed(Panels::F32(&pb)),
            start: Start::Zero,
            precision: CpuPrecision::F32,
        };
        let tasks = blocks(isa, &p, 2);
        assert!(tasks.len() > 1);
        assert!(
            tasks.iter().all(|t| t.m0 == 0 && t.m1 == m),
            "rows were split"
        );
        // The same product with a small B splits rows, as before.
        let small = Product { n: 64, ..p };
        assert!(blocks(isa, &small, 2).iter().any(|t| t.m1 - t.m0 < m));
        let want = naive(m, n, k, &a, &b);
        let mut one = vec![0.0_f32; m * n];
        unsafe { run(isa, &[p], &[one.as_mut_ptr()], n, 1) };
        close(&one, &want, k);
        for threads in [2, 3] {
            let mut c = vec![0.0_f32; m * n];
            unsafe { run(isa, &[p], &[c.as_mut_ptr()], n, threads) };
            assert_eq!(one, c);
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let isa = CpuIsa::detect();
        let (m, n, k) = (300, 500, 700);
        let a = data(m * k, 0.7);
        let b = data(k * n, 0.8);
        let run_with = |threads| {
            let mut c = vec![0.0_f32; m * n];
            let p = Product {
                m,
                n,
                k,
                a: ASource::Strided(Strided {
                    data: &a,
                    rs: k,
                    cs: 1,
                }),
                b: BSource::Strided(Strided {
                    data: &b,
                    rs: n,
                    cs: 1,
                }),
                start: Start::Zero,
                precision: CpuPrecision::F32,
            };
            unsafe { run(isa, &[p], &[c.as_mut_ptr()], n, threads) };
            c
        };
        let one = run_with(1);
        assert_eq!(one, run_with(2));
        assert_eq!(one, run_with(5));
    }
}
