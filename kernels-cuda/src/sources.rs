//! The CUDA C sources, embedded in the binary and compiled by NVRTC at start-up for the
//! device's architecture. Each module is the shared prelude followed by its own file.

pub const PRELUDE: &str = include_str!("cu/prelude.cuh");

/// A compilation unit and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    pub name: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

pub const MODULES: &[Module] = &[
    Module {
        name: "elementwise",
        source: include_str!("cu/elementwise.cu"),
        kernels: &[
            "rope_yarn",
            "silu_mul",
            "scatter_add_rows",
            "embedding_bf16",
            "rms_norm_rows",
            "add_f32",
            "write_rows",
            "write_rows_bf16",
            "split_bf16",
            "take_rows",
        ],
    },
    Module {
        name: "router",
        source: include_str!("cu/router.cu"),
        kernels: &["route_topk"],
    },
    Module {
        name: "matmul",
        source: include_str!("cu/matmul.cu"),
        kernels: &[
            "int4_gemv",
            "int4_gemv_1",
            "int4_gemm",
            "fp8_gemv",
            "fp8_gemm",
            "bf16_gemv",
            "bf16_gemm",
            "f32_gemv",
            "f32_gemm",
            "int4_dequant_rows",
            "int4_dequant_split_bf16",
            "fp8_dequant_rows",
            "bf16_dequant_rows",
            "f32_matmul_t",
            "moe_gate_up_int4",
            "moe_down_int4",
            "moe_combine",
            "int4_tc_split_x",
            "int4_tc_matmul_1",
            "int4_tc_matmul_2",
            "int4_tc_matmul_4",
        ],
    },
    Module {
        name: "mla",
        source: include_str!("cu/mla.cu"),
        kernels: &[
            "mla_decode_partial",
            "mla_decode_partial_bf16",
            "mla_decode_tc_bf16",
            "mla_decode_combine",
            "mla_absorb_queries",
            "mla_expand_values",
        ],
    },
];

/// The full text NVRTC compiles for a module.
pub fn full_source(m: &Module) -> String {
    format!("{PRELUDE}\n// ---- {} ----\n{}", m.name, m.source)
}
