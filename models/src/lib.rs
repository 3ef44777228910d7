//! abridge's models: the encoders and generators the stages call, behind two traits
//! ([`encoder::Encoder`], [`generator::Generator`]), as text-embeddings-inference and
//! mistral.rs keep theirs apart from what calls them.
//!
//! - [`engine`]: what every generator model decodes on: the batch scheduler (continuous
//!   batching on its own thread), per-sequence and paged KV caches, attention over them,
//!   packed products for decoding steps, chat templates.
//! - [`models`]: one forward pass per architecture (BERT, BLOOM, Llama and Qwen2) over the engine's
//!   pieces and [`kernels`]; each model implements [`engine::BatchModel`] and has the
//!   constructor that starts an engine over it.
//! - [`mistralrs`] (cargo feature `mistralrs`): the adapter to mistral.rs, for the
//!   architectures it loads.
//! - [`gguf`]: GGUF headers checked against their file before any reader trusts them.
//! - [`fingerprint`]: a model's digest by content, and the engines' version, for every
//!   decision to reuse an answer.
//!
//! Nothing here knows of Arrow, job files or the CLI.

pub mod encoder;
pub mod engine;
pub mod fingerprint;
pub mod generator;
pub mod gguf;
mod kernels;
#[cfg(feature = "mistralrs")]
pub mod mistralrs;
pub mod models;
pub mod stall;

use std::path::PathBuf;

/// abridge's cache folder: `$ABRIDGE_CACHE`, else `~/.cache/abridge`, the folder the
/// scripts fetch models into and the shipped job files name (so not `$XDG_CACHE_HOME`,
/// which those paths would not follow).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("ABRIDGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs::home_dir().unwrap_or_default().join(".cache/abridge"))
}

/// The cases a property test that feeds a reader changed or arbitrary bytes runs:
/// `$ABRIDGE_FUZZ_CASES` (scripts/fuzz sets it high), else `default` (what CI runs).
pub fn fuzz_cases(default: u32) -> u32 {
    std::env::var("ABRIDGE_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// `bytes` with each `(at, byte)` of `changes` written where it falls inside, then cut to
/// `cut` bytes: the input the readers' property tests feed them.
pub fn changed_bytes(mut bytes: Vec<u8>, changes: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(at, byte) in changes {
        if let Some(b) = bytes.get_mut(at) {
            *b = byte;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut);
    }
    bytes
}

/// The model folder a test or benchmark uses: `$ABRIDGE_MODELS/<name>`, else the cache
/// that scripts/fetch-models fills.
pub fn cached_model_dir(name: &str) -> PathBuf {
    let models = std::env::var_os("ABRIDGE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models"));
    models.join(name)
}

/// The floating-point type a model computes in (`dtype` of `[embed]`): on CUDA half types
/// halve its memory and traffic; on the CPU they are exact but slower (candle's CPU
/// kernels widen them), there for checking a half forward against its peer's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The checkpoint's own type on CUDA, float32 on the CPU.
    #[default]
    Auto,
    Float32,
    Float16,
    Bfloat16,
}

impl Precision {
    /// Whether this is the default, [`Precision::Auto`] (left out of recorded settings,
    /// so that jobs which never set it keep their fingerprints).
    pub fn is_auto(&self) -> bool {
        *self == Precision::Auto
    }

    /// The type to compute in on `device` for a checkpoint stored in `stored`.
    pub fn dtype(
        self,
        device: &candle_core::Device,
        stored: candle_core::DType,
    ) -> candle_core::DType {
        use candle_core::DType;
        match self {
            Precision::Auto if device.is_cpu() => DType::F32,
            Precision::Auto => match stored {
                DType::F16 | DType::BF16 | DType::F32 => stored,
                _ => DType::F32,
            },
            Precision::Float32 => DType::F32,
            Precision::Float16 => DType::F16,
            Precision::Bfloat16 => DType::BF16,
        }
    }
}

/// The device `cpu`, `cuda` or `cuda:N` names, or why it cannot be used.
pub fn device(name: &str) -> Result<candle_core::Device, String> {
    match name.trim() {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => Err(format!("`{other}` is not cpu, cuda or cuda:N")),
        },
    }
}

fn cuda(ordinal: usize) -> Result<candle_core::Device, String> {
    if !candle_core::utils::cuda_is_available() {
        return Err(NO_CUDA.into());
    }
    candle_core::Device::new_cuda(ordinal).map_err(|e| format!("CUDA device {ordinal}: {e}"))
}

/// Why [`device`] refuses CUDA in a build without it: a job file may still name a GPU
/// device (it is checked when the stage is built, on the machine that runs it).
pub const NO_CUDA: &str = "this abridge was built without the `cuda` feature; \
     build it with `scripts/build-cuda` or use device = \"cpu\"";
