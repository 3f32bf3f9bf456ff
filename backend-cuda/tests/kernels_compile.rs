//! Every kernel compiles with NVRTC for Hopper (sm_90a) and Blackwell (sm_100a), with no GPU needed.
//! Prints each kernel's registers and spills. Without libnvrtc the test fails (never skips).

use e4m3_backend_cuda::{compile_check, nvrtc_present, nvrtc_version, KERNELS};

#[test]
fn every_kernel_compiles_for_sm90a_and_sm100a() {
    assert!(
        nvrtc_present(),
        "libnvrtc not found: run scripts/setup.sh (it installs PyPI nvidia-cuda-nvrtc) and put nvidia/cu13/lib on LD_LIBRARY_PATH (scripts/test.sh does)"
    );
    let (maj, min) = nvrtc_version().expect("NVRTC version");
    eprintln!("NVRTC {maj}.{min}");
    for arch in ["sm_90a", "sm_100a"] {
        let reports = compile_check(arch).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "{:<12} {:<22} {:>5} {:>6} {:>6} {:>6}",
            "file", "kernel", "regs", "spillS", "spillL", "stack"
        );
        for r in &reports {
            eprintln!(
                "{:<12} {:<22} {:>5} {:>6} {:>6} {:>6}  {}",
                r.file, r.kernel, r.registers, r.spill_stores, r.spill_loads, r.stack_bytes, r.arch
            );
        }
        for (file, names) in KERNELS {
            for n in *names {
                let r = reports
                    .iter()
                    .find(|r| r.kernel == *n && r.file == *file)
                    .unwrap_or_else(|| panic!("{arch}: kernel {n} not found in {file}.cu"));
                assert!(
                    r.registers > 0 && r.registers <= 255,
                    "{arch} {n}: {} registers",
                    r.registers
                );
                assert!(
                    r.spill_stores <= 256 && r.spill_loads <= 256,
                    "{arch} {n}: {} bytes of spill stores, {} of spill loads",
                    r.spill_stores,
                    r.spill_loads
                );
            }
        }
        let launched: usize = KERNELS.iter().map(|(_, n)| n.len()).sum();
        assert_eq!(
            reports.len(),
            launched,
            "{arch}: kernels compiled but never launched"
        );
    }
}
