//! Runs the CUDA kernels on the CPU: `tests/emulation/check.cpp` compiles every kernel
//! module with the host C++ compiler against an emulator of the CUDA execution model
//! (`tests/emulation/emu.h`: a thread per CUDA thread, barriers for `__syncthreads` and the
//! warp operations, the PTX ISA's fragment layout for `mma.sync`), runs each kernel on small
//! random problems, tiles and masks included, and compares with double-precision loops.
//!
//! This checks indexing, tiling, split-K, the online softmax and the masks without a GPU;
//! the GPU tests (`tests/gpu.rs`) check the real hardware. Without a C++20 compiler (`CXX`,
//! else `c++`) the test prints why and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use sd_cuda::kernels::{COMMON_HEADER, Kernel, Module};

fn compiler() -> Option<String> {
    std::env::var("CXX")
        .ok()
        .into_iter()
        .chain(["c++".to_string(), "g++".to_string(), "clang++".to_string()])
        .find(|cxx| {
            Command::new(cxx)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// common.cuh, then every module with all its instantiations.
fn kernels_source() -> String {
    let mut src = format!("#line 1 \"common.cuh\"\n{COMMON_HEADER}\n");
    for m in Module::ALL {
        src.push_str(&format!("#line 1 \"{}\"\n{}\n", m.file_name(), m.body()));
        for k in Kernel::all().into_iter().filter(|k| k.module() == m) {
            src.push_str(&k.instantiation());
            src.push('\n');
        }
    }
    src
}

#[test]
#[ignore = "slow (about 100 s on 2 cores): runs every CUDA kernel in a CPU emulator; cargo test -p sd-cuda --test emulation -- --ignored"]
fn kernels_match_references_in_the_cpu_emulator() {
    let Some(cxx) = compiler() else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED kernels_match_references_in_the_cpu_emulator: no C++ compiler (set CXX)"
        );
        return;
    };
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulation");
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sd-cuda-emulation");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("kernels.inc"), kernels_source()).unwrap();
    let exe = out_dir.join("check");
    let build = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-pthread",
            "-fno-strict-aliasing",
            "-Wno-unknown-pragmas",
        ])
        .arg("-I")
        .arg(&here)
        .arg("-I")
        .arg(&out_dir)
        .arg(here.join("check.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    if !build.status.success() {
        let err = String::from_utf8_lossy(&build.stderr);
        // An old compiler without C++20's <barrier> cannot run the emulator: not a kernel bug.
        if err.contains("barrier: No such file") {
            let _ = writeln!(std::io::stderr(), "SKIPPED: {cxx} has no C++20 <barrier>");
            return;
        }
        panic!("{cxx} could not build the emulator:\n{err}");
    }
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}");
    assert!(
        run.status.success(),
        "kernels disagree with the references in the emulator:\n{}\n{}",
        stdout
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&run.stderr)
    );
}
