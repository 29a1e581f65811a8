//! Every kernel module compiles with NVRTC for sm_80 (A100) and sm_90 (H100/H200), defines
//! exactly the kernels `Kernel::all()` names, uses the tensor cores where it says so, and
//! agrees with the Rust side on the layout of its parameter structs. Needs NVRTC only (no
//! GPU, no driver); without it the tests print why and pass. `ci/install-nvrtc.sh` installs
//! NVRTC from PyPI:
//!
//! ```text
//! export LD_LIBRARY_PATH="$(bash crates/sd-cuda/ci/install-nvrtc.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
//! cargo test -p sd-cuda --test kernels_compile -- --nocapture
//! ```
//!
//! With `--nocapture` each test prints the PTX and cubin sizes and ptxas's registers, spills
//! and shared memory per kernel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::Instant;

use sd_cuda::kernels::{self, Arch, Half, HeadDim, Kernel, Module, Taps, Target, Unit};
use sd_cuda::{CudaError, loader};

/// Whether NVRTC is usable; prints why not (and the test then passes without checking).
fn nvrtc_or_skip(test: &str) -> bool {
    match loader::nvrtc_version() {
        Ok((major, minor)) => {
            eprintln!("{test}: NVRTC {major}.{minor}");
            true
        }
        Err(CudaError::NvrtcNotFound { searched }) => {
            // Straight to stderr: the test harness does not capture it, so the skip shows.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: NVRTC is not installed (tried {searched}). Run \
                 `export LD_LIBRARY_PATH=\"$(bash crates/sd-cuda/ci/install-nvrtc.sh)\"` first."
            );
            false
        }
        Err(e) => panic!("{test}: NVRTC is present but unusable: {e}"),
    }
}

/// The PTX between `.entry name(` and the next entry.
fn body<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx
        .find(&format!(".entry {name}("))
        .unwrap_or_else(|| panic!("{name} not in the PTX"));
    let rest = &ptx[start + 1..];
    let end = rest.find(".entry ").map_or(rest.len(), |e| e);
    &rest[..end]
}

fn compile_all_for(arch: Arch) {
    let test = format!("kernels compile for {arch}");
    if !nvrtc_or_skip(&test) {
        return;
    }
    let supported = kernels::supported_archs().unwrap();
    assert!(
        supported.contains(&arch.number()),
        "this NVRTC ({supported:?}) cannot target {arch}"
    );
    let all = Kernel::all();
    let mut report = Vec::new();
    for module in Module::ALL {
        let t0 = Instant::now();
        let compiled = match kernels::compile(module, Target::Cubin(arch), true) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let secs = t0.elapsed().as_secs_f64();
        let cubin = compiled.cubin.as_ref().map_or(0, Vec::len);
        assert!(cubin > 0, "{module}: empty cubin");
        // Exactly the kernels the enum names, both ways.
        let entries: BTreeSet<String> = compiled.entries().into_iter().collect();
        let expected: BTreeSet<String> = all
            .iter()
            .filter(|k| k.module() == module)
            .map(|k| k.name())
            .collect();
        assert_eq!(
            entries, expected,
            "{module}: PTX entries against Kernel::all()"
        );
        // The tensor-core kernels do use the tensor cores.
        for k in all.iter().filter(|k| k.module() == module) {
            let tc = matches!(
                k,
                Kernel::ConvTensorCore { .. } | Kernel::AttentionTensorCore { .. }
            );
            let uses_mma = body(&compiled.ptx, &k.name()).contains("mma.sync.aligned.m16n8k16");
            assert_eq!(
                tc,
                uses_mma,
                "{}: tensor-core kernel iff mma.sync",
                k.name()
            );
        }
        let resources = compiled.resources();
        assert_eq!(
            resources.len(),
            expected.len(),
            "{module}: ptxas reported every kernel"
        );
        report.push(format!(
            "{module:<15} PTX {:>8} bytes, cubin {cubin:>8} bytes, {secs:5.1} s",
            compiled.ptx.len()
        ));
        for r in resources {
            let dynamic = all
                .iter()
                .find(|k| k.name() == r.name)
                .map_or(0, |k| k.dynamic_shared_bytes());
            report.push(format!(
                "    {:<26} {:>3} registers, spills {:>3}/{:>3} bytes (store/load), shared {:>6} static + {:>6} dynamic",
                r.name, r.registers, r.spill_stores, r.spill_loads, r.shared_bytes, dynamic
            ));
            // An SM has 64K registers: every kernel must fit its block.
            assert!(r.registers <= 255, "{}: {} registers", r.name, r.registers);
        }
    }
    eprintln!(
        "{test} (options {:?}):\n{}",
        kernels::options(Target::Cubin(arch), true),
        report.join("\n")
    );
}

#[test]
fn every_kernel_compiles_for_sm80() {
    compile_all_for(Arch::SM80);
}

#[test]
fn every_kernel_compiles_for_sm90() {
    compile_all_for(Arch::SM90);
}

/// The heavy modules are compiled one kernel at a time by the backend: such a unit compiles
/// and defines exactly its kernel.
#[test]
fn single_kernel_units_compile() {
    if !nvrtc_or_skip("single-kernel units") {
        return;
    }
    for k in [
        Kernel::AttentionTensorCore {
            dtype: Half::BF16,
            head: HeadDim::D48,
        },
        Kernel::ConvTensorCore {
            dtype: Half::F16,
            taps: Taps::K3,
        },
    ] {
        assert_eq!(k.unit(), Unit::Kernel(k));
        let c = kernels::compile_unit(k.unit(), Target::Cubin(Arch::SM90), false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.entries(), vec![k.name()]);
    }
    assert_eq!(
        Kernel::Unary(kernels::Float::F16).unit(),
        Unit::Module(Module::Elementwise)
    );
}

/// The `#[repr(C)]` parameter structs have the size and field offsets of the CUDA structs
/// they are passed as (checked by static_assert in NVRTC).
#[test]
fn parameter_structs_match_the_kernels() {
    if !nvrtc_or_skip("parameter structs") {
        return;
    }
    for s in sd_cuda::abi::shared_structs() {
        let src = s.module.source();
        let start = src
            .find(&format!("struct {} {{", s.name))
            .unwrap_or_else(|| panic!("struct {} not in {}", s.name, s.module));
        let end = start + src[start..].find("};").unwrap() + 2;
        let mut prog = format!("{}\n{}\n", kernels::COMMON_HEADER, &src[start..end]);
        prog.push_str(&format!(
            "static_assert(sizeof({0}) == {1}, \"size of {0}\");\n",
            s.name, s.size
        ));
        for (field, offset) in &s.fields {
            prog.push_str(&format!(
                "static_assert(__builtin_offsetof({0}, {field}) == {offset}, \"offset of {0}::{field}\");\n",
                s.name
            ));
        }
        if let Err(e) = kernels::compile_source("abi.cu", &prog, Target::Ptx(Arch::SM80), false) {
            panic!("{} differs between Rust and CUDA: {e}", s.name);
        }
    }
}

/// A kernel that does not compile is an error carrying the compiler's log (so the tests
/// above can fail).
#[test]
fn a_broken_kernel_is_a_compile_error() {
    if !nvrtc_or_skip("broken kernel") {
        return;
    }
    let src = "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }";
    match kernels::compile_source("broken.cu", src, Target::Cubin(Arch::SM90), false) {
        Err(CudaError::Compile { program, log, .. }) => {
            assert_eq!(program, "broken.cu");
            assert!(log.contains("undefined_name"), "{log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}
