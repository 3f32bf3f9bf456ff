//! cuBLASLt FP8 GEMM (tensor cores) for the per-tensor and per-channel/per-token schemes: the raw f32
//! accumulators of `xq · wq^T` (E4M3 x E4M3, FP32 compute, FP32 output); the scales are applied by the
//! `fp8_gemm_epilogue` kernel. cudarc's safe cuBLASLt layer has no FP8, so this uses its `result` layer.

use std::ffi::c_void;

use cudarc::cublaslt::{result as lt, sys};
use e4m3_core::error::{Error, Result};

pub struct Lt {
    handle: sys::cublasLtHandle_t,
    pub workspace: u64,
    pub workspace_bytes: usize,
}

// The handle is used from one thread at a time (the runner is behind &mut).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::invalid(format!("cuBLASLt {what}: {e:?}"))
}

impl Lt {
    pub fn new(workspace: u64, workspace_bytes: usize) -> Result<Lt> {
        let handle = lt::create_handle().map_err(|e| err("create", e))?;
        Ok(Lt {
            handle,
            workspace,
            workspace_bytes,
        })
    }

    /// `d[t, n] = sum_k x[t, k] * w[n, k]` with x, w E4M3 codes (row-major) and d f32 (row-major).
    /// Column-major view: D (n x t) = W^T(op T of a k x n matrix) * X (k x t): cuBLASLt's "TN" layout.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_gemm(
        &self,
        stream: u64,
        w: u64,
        x: u64,
        d: u64,
        n: usize,
        k: usize,
        t: usize,
    ) -> Result<()> {
        unsafe {
            let desc = lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(|e| err("matmul descriptor", e))?;
            let ta: i32 = 1; // CUBLAS_OP_T
            let tb: i32 = 0; // CUBLAS_OP_N
            let mut result = lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta as *const _ as *const c_void,
                std::mem::size_of_val(&ta),
            )
            .and_then(|_| {
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                    &tb as *const _ as *const c_void,
                    std::mem::size_of_val(&tb),
                )
            })
            .map_err(|e| err("transpose attributes", e));
            let e4m3 = sys::cudaDataType_t::CUDA_R_8F_E4M3;
            let f32t = sys::cudaDataType_t::CUDA_R_32F;
            let mut layouts = Vec::new();
            for (ty, rows, cols, ld) in [(e4m3, k, n, k), (e4m3, k, t, k), (f32t, n, t, n)] {
                match lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64) {
                    Ok(l) => layouts.push(l),
                    Err(e) => {
                        if result.is_ok() {
                            result = Err(err("matrix layout", e));
                        }
                    }
                }
            }
            let pref = lt::create_matmul_pref().map_err(|e| err("preference", e));
            if let (Ok(()), Ok(pref), 3) = (&result, &pref, layouts.len()) {
                let ws = self.workspace_bytes;
                let r = lt::set_matmul_pref_attribute(
                    *pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const _ as *const c_void,
                    std::mem::size_of_val(&ws),
                )
                .map_err(|e| err("workspace preference", e))
                .and_then(|_| {
                    lt::get_matmul_algo_heuristic(
                        self.handle,
                        desc,
                        layouts[0],
                        layouts[1],
                        layouts[2],
                        layouts[2],
                        *pref,
                    )
                    .map_err(|e| {
                        err(
                            &format!("has no FP8 algorithm for n={n} k={k} t={t} with f32 output"),
                            e,
                        )
                    })
                });
                result = r.and_then(|heur| {
                    let (alpha, beta) = (1.0f32, 0.0f32);
                    lt::matmul(
                        self.handle,
                        desc,
                        &alpha as *const f32 as *const c_void,
                        &beta as *const f32 as *const c_void,
                        w as *const c_void,
                        layouts[0],
                        x as *const c_void,
                        layouts[1],
                        d as *const c_void,
                        layouts[2],
                        d as *mut c_void,
                        layouts[2],
                        &heur.algo,
                        self.workspace as *mut c_void,
                        self.workspace_bytes,
                        stream as sys::cudaStream_t,
                    )
                    .map_err(|e| err("FP8 matmul", e))
                });
            }
            if let Ok(p) = pref {
                let _ = lt::destroy_matmul_pref(p);
            }
            for l in layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(desc);
            result
        }
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
