//! logsluice: the Rust core and, behind the `python` feature, its PyO3 binding.

pub mod breaker;
pub mod config;
pub mod destinations;
pub mod encode;
pub mod flock;
pub mod http;
pub mod json_text;
pub mod metrics;
pub mod per_process;
pub mod pipeline;
pub mod queue;
pub mod read;
pub mod record;
pub mod retry;
#[doc(hidden)]
pub mod scratch;
pub mod spill;

#[cfg(feature = "python")]
mod py;

// In the library so it covers the extension, `cargo test` and the benches alike.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The native module `logsluice._core`; the public names live in `python/logsluice`.
#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _core(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    py::register(m)
}
