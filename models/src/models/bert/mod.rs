//! BERT-family sentence encoders (BERT, GTE, BGE, MiniLM, e5) on candle, with the pooling
//! and truncation that their sentence-transformers configuration asks for.
//!
//! A model folder in Hugging Face layout holds `config.json`, `tokenizer.json`,
//! `model.safetensors` and, from sentence-transformers, `modules.json`,
//! `sentence_bert_config.json` (`max_seq_length`) and the pooling module's `config.json`
//! (mean or CLS). Texts are sorted by token count and batched so that each batch pads only
//! to its own longest text: padding is wasted compute, and ticket lengths vary widely.

mod net;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;
use rayon::prelude::*;
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

use self::net::{BertNet, l2_normalize, pool};
use crate::Precision;
use crate::encoder::{Encoded, Encoder, EncoderError};

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average of the token vectors (padding excluded).
    Mean,
    /// The `[CLS]` token's vector.
    Cls,
}

/// A loaded BERT-family encoder.
pub struct BertEncoder {
    model: BertNet,
    tokenizer: Tokenizer,
    pooling: Pooling,
    dim: usize,
    batch_size: usize,
    /// Most tokens of one forward pass, padding included ([`token_batches`]).
    max_batch_tokens: usize,
    pool: rayon::ThreadPool,
    device: Device,
    fingerprint: String,
}

#[derive(Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl BertEncoder {
    /// Loads the model in `dir` on `device`; `batch_size` texts go through one forward pass.
    pub fn load(dir: &Path, device: &Device, batch_size: usize) -> Result<Self, EncoderError> {
        Self::load_in(dir, device, batch_size, Precision::Auto)
    }

    /// As [`BertEncoder::load`], computing in `precision`'s type.
    pub fn load_in(
        dir: &Path,
        device: &Device,
        batch_size: usize,
        precision: Precision,
    ) -> Result<Self, EncoderError> {
        let config_text = read(dir, "config.json")?;
        let raw: serde_json::Value = json(dir, "config.json", &config_text)?;
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let architectures = raw
            .get("architectures")
            .map(|v| v.to_string())
            .unwrap_or_default();
        if model_type != "bert" && !architectures.contains("Bert") {
            return Err(EncoderError::NotBert {
                dir: dir.to_path_buf(),
                found: format!("model_type={model_type:?} architectures={architectures}"),
            });
        }
        let config: Config = json(dir, "config.json", &config_text)?;

        let (pooling, max_seq_length) = sentence_transformers_settings(dir, &config)?;

        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            EncoderError::MissingFile {
                dir: dir.to_path_buf(),
                file: "tokenizer.json".into(),
                reason: e.to_string(),
            }
        })?;
        // tokenizer.json often carries the training setup (fixed padding, short
        // truncation); sentence-transformers truncates to max_seq_length and pads per batch.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                ..Default::default()
            }))
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);

        let weights_path = dir.join("model.safetensors");
        let fingerprint = fingerprint(dir, &config_text, pooling, max_seq_length)?;
        let weights = candle_core::safetensors::load(&weights_path, device).map_err(|e| {
            EncoderError::MissingFile {
                dir: dir.to_path_buf(),
                file: "model.safetensors".into(),
                reason: e.to_string(),
            }
        })?;
        let stored = weights.values().next().map_or(DType::F32, Tensor::dtype);
        let dtype = precision.dtype(device, stored);
        // Vectors of another type differ (slightly): the index must tell them apart.
        let fingerprint = match dtype {
            DType::F32 => fingerprint,
            other => format!("{fingerprint}-{other:?}").to_lowercase(),
        };
        let vb = VarBuilder::from_tensors(weights, dtype, device);
        let model = BertNet::load(vb, &config).map_err(|e| EncoderError::BadFile {
            dir: dir.to_path_buf(),
            file: "model.safetensors".into(),
            reason: format!("weights do not match config.json: {e}"),
        })?;
        Ok(Self {
            model,
            tokenizer,
            pooling,
            dim: config.hidden_size,
            batch_size: batch_size.max(1),
            max_batch_tokens: default_batch_tokens(device),
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
                .thread_name(|i| format!("abridge-encoder-{i}"))
                .build()
                .map_err(|e| EncoderError::Threads(e.to_string()))?,
            device: device.clone(),
            fingerprint,
        })
    }

    /// At most `tokens` tokens (padding included) per forward pass, instead of the
    /// device's default ([`default_batch_tokens`]).
    pub fn with_max_batch_tokens(mut self, tokens: usize) -> Self {
        self.max_batch_tokens = tokens.max(1);
        self
    }

    /// The pooling this model uses.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    fn forward(&self, encodings: &[&tokenizers::Encoding]) -> Result<Tensor, EncoderError> {
        let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let n = encodings.len();
        let mut ids = vec![0u32; n * len];
        let mut types = vec![0u32; n * len];
        let mut mask = vec![0u32; n * len];
        for (row, encoding) in encodings.iter().enumerate() {
            let base = row * len;
            let k = encoding.len();
            ids[base..base + k].copy_from_slice(encoding.get_ids());
            types[base..base + k].copy_from_slice(encoding.get_type_ids());
            mask[base..base + k].copy_from_slice(encoding.get_attention_mask());
        }
        let padded = encodings.iter().any(|e| e.len() != len);
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let types = Tensor::from_vec(types, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let lens: Vec<usize> = encodings.iter().map(|e| e.len().max(1)).collect();
        let hidden = self
            .model
            .forward(&ids, &types, padded.then_some(&mask), &lens)?;
        // Pooled and normalized in f32 whatever the model computed in.
        let hidden = hidden.to_dtype(DType::F32)?;
        let pooled = pool(&hidden, &mask, self.pooling == Pooling::Mean)?;
        Ok(l2_normalize(&pooled)?)
    }
}

impl Encoder for BertEncoder {
    fn dim(&self) -> usize {
        self.dim
    }

    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn encode(&self, texts: &[&str]) -> Result<Encoded, EncoderError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        // Truncation moves the tokens past max_seq_length into overflowing encodings
        // (each with its own special tokens): the text's tokens the vector never sees.
        let cut_tokens = encodings
            .iter()
            .map(|e| {
                let cut: usize = e
                    .get_overflowing()
                    .iter()
                    .map(|o| {
                        o.get_special_tokens_mask()
                            .iter()
                            .filter(|&&m| m == 0)
                            .count()
                    })
                    .sum();
                u32::try_from(cut).unwrap_or(u32::MAX)
            })
            .collect();
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| encodings[i].len());
        // Batches run in parallel, one per core: candle parallelizes its matmuls but not
        // its other kernels, and small batches' matmuls split poorly; whole batches keep
        // every core busy. Nested matmul parallelism shares the same rayon pool.
        let length = |i: usize| encodings[i].len();
        let chunks = token_batches(&order, length, self.batch_size, self.max_batch_tokens);
        let vectors: Vec<Vec<Vec<f32>>> = self.pool.install(|| {
            chunks
                .par_iter()
                .map(|chunk| {
                    let batch: Vec<&tokenizers::Encoding> =
                        chunk.iter().map(|&i| &encodings[i]).collect();
                    Ok(self.forward(&batch)?.to_vec2::<f32>()?)
                })
                .collect::<Result<_, EncoderError>>()
        })?;
        let mut out = vec![0f32; texts.len() * self.dim];
        for (chunk, vectors) in chunks.iter().zip(vectors) {
            for (&i, vector) in chunk.iter().zip(vectors) {
                out[i * self.dim..(i + 1) * self.dim].copy_from_slice(&vector);
            }
        }
        Ok(Encoded {
            vectors: out,
            cut_tokens,
        })
    }

    fn count_tokens(&self, text: &str) -> Result<usize, EncoderError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        Ok(encoding.len())
    }
}

/// Tokens per forward pass where a job sets none (`embed.max_batch_tokens`): on a GPU
/// enough for 128 texts of 512 tokens, which keeps it busy; on the CPU 32 of 256 (MiniLM's
/// limit), where larger batches only wait longer for their longest text.
pub fn default_batch_tokens(device: &Device) -> usize {
    match device {
        Device::Cpu => 8192,
        _ => 65536,
    }
}

/// `order` (texts sorted by token count, `length` of each) cut into forward passes of at
/// most `cap` texts and `budget` tokens once padded to their longest text, as
/// text-embeddings-inference batches: short texts go many at a time, long ones few; a
/// text longer than the budget goes alone.
fn token_batches(
    order: &[usize],
    length: impl Fn(usize) -> usize,
    cap: usize,
    budget: usize,
) -> Vec<&[usize]> {
    let mut batches = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len()
            && end - start < cap
            && (end + 1 - start) * length(order[end]) <= budget
        {
            end += 1;
        }
        batches.push(&order[start..end]);
        start = end;
    }
    batches
}

/// Pooling and max sequence length from the sentence-transformers files, with the
/// library's defaults where they are absent (mean pooling; the model's position limit).
fn sentence_transformers_settings(
    dir: &Path,
    config: &Config,
) -> Result<(Pooling, usize), EncoderError> {
    let mut pooling = Pooling::Mean;
    if let Ok(text) = std::fs::read_to_string(dir.join("modules.json")) {
        let modules: Vec<Module> = json(dir, "modules.json", &text)?;
        if let Some(module) = modules.iter().find(|m| m.kind.ends_with(".Pooling")) {
            let file = Path::new(&module.path).join("config.json");
            let name = file.display().to_string();
            let text = read(dir, &name)?;
            let p: PoolingConfig = json(dir, &name, &text)?;
            pooling = match (p.pooling_mode_cls_token, p.pooling_mode_mean_tokens) {
                (true, false) => Pooling::Cls,
                (false, true) => Pooling::Mean,
                _ => {
                    return Err(EncoderError::BadFile {
                        dir: dir.to_path_buf(),
                        file: name,
                        reason: "only one of mean or CLS pooling is supported".into(),
                    });
                }
            };
            if p.pooling_mode_max_tokens || p.pooling_mode_mean_sqrt_len_tokens {
                return Err(EncoderError::BadFile {
                    dir: dir.to_path_buf(),
                    file: name,
                    reason: "max and mean-sqrt-len pooling are not supported".into(),
                });
            }
        }
    }
    let mut max_len = config.max_position_embeddings;
    if let Ok(text) = std::fs::read_to_string(dir.join("sentence_bert_config.json")) {
        let st: SentenceBertConfig = json(dir, "sentence_bert_config.json", &text)?;
        if let Some(m) = st.max_seq_length {
            max_len = max_len.min(m);
        }
    }
    Ok((pooling, max_len))
}

/// A digest of what decides the model's vectors: its config, tokenizer, pooling, length
/// limit and weights (every byte: fine-tuned copies of one model share the rest).
fn fingerprint(
    dir: &Path,
    config: &str,
    pooling: Pooling,
    max_seq_length: usize,
) -> Result<String, EncoderError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(config.as_bytes());
    hasher.update(format!("{pooling:?} {max_seq_length}").as_bytes());
    for file in ["tokenizer.json", "model.safetensors"] {
        let missing = |e: std::io::Error| EncoderError::MissingFile {
            dir: dir.to_path_buf(),
            file: file.into(),
            reason: e.to_string(),
        };
        let reader = std::fs::File::open(dir.join(file)).map_err(missing)?;
        hasher.update_reader(reader).map_err(missing)?;
    }
    Ok(hasher.finalize().to_hex()[..16].to_string())
}

fn read(dir: &Path, file: &str) -> Result<String, EncoderError> {
    std::fs::read_to_string(dir.join(file)).map_err(|e| EncoderError::MissingFile {
        dir: dir.to_path_buf(),
        file: file.to_string(),
        reason: e.to_string(),
    })
}

fn json<T: for<'de> Deserialize<'de>>(
    dir: &Path,
    file: &str,
    text: &str,
) -> Result<T, EncoderError> {
    serde_json::from_str(text).map_err(|e| EncoderError::BadFile {
        dir: dir.to_path_buf(),
        file: file.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cached_model_dir;

    #[derive(Deserialize)]
    struct Fixture {
        texts: Vec<String>,
        embeddings: Vec<Vec<f32>>,
    }

    fn fixture() -> Fixture {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/minilm-l6-v2-embeddings.json");
        let text = std::fs::read_to_string(&path).expect("fixture present");
        serde_json::from_str(&text).expect("fixture parses")
    }

    fn model() -> BertEncoder {
        let dir = cached_model_dir("minilm-l6-v2");
        BertEncoder::load(&dir, &Device::Cpu, 4)
            .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-models)"))
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    }

    /// Reference vectors from sentence-transformers (scripts/make-encoder-fixture.py).
    #[test]
    fn matches_sentence_transformers() {
        let fixture = fixture();
        let model = model();
        assert_eq!(model.pooling(), Pooling::Mean);
        let texts: Vec<&str> = fixture.texts.iter().map(String::as_str).collect();
        let got = model.encode(&texts).unwrap().vectors;
        for (i, expected) in fixture.embeddings.iter().enumerate() {
            let vector = &got[i * model.dim()..(i + 1) * model.dim()];
            let c = cosine(vector, expected);
            assert!(
                c >= 0.9999,
                "text {i} ({:?}...): cosine {c}",
                texts[i].chars().take(30).collect::<String>()
            );
            let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn batched_equals_one_at_a_time() {
        let fixture = fixture();
        let model = model();
        let texts: Vec<&str> = fixture.texts.iter().map(String::as_str).collect();
        let batched = model.encode(&texts).unwrap().vectors;
        for (i, text) in texts.iter().enumerate() {
            let single = model.encode(&[text]).unwrap().vectors;
            let c = cosine(&single, &batched[i * model.dim()..(i + 1) * model.dim()]);
            assert!(c >= 0.99999, "text {i}: cosine {c}");
        }
    }

    /// In bfloat16 (on the CPU: exact, slower) the vectors are sentence-transformers' in
    /// bfloat16, and not the float32 ones: the type is really used.
    #[test]
    fn bfloat16_matches_sentence_transformers_in_bfloat16() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/minilm-l6-v2-embeddings-bfloat16.json");
        let text = std::fs::read_to_string(&path).expect("fixture present");
        let theirs: Fixture = serde_json::from_str(&text).expect("fixture parses");
        let dir = cached_model_dir("minilm-l6-v2");
        let half = BertEncoder::load_in(&dir, &Device::Cpu, 4, Precision::Bfloat16)
            .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-models)"));
        assert!(
            half.fingerprint().ends_with("-bf16"),
            "{}",
            half.fingerprint()
        );
        let texts: Vec<&str> = theirs.texts.iter().map(String::as_str).collect();
        let ours = half.encode(&texts).unwrap().vectors;
        let full = model().encode(&texts).unwrap().vectors;
        let dim = half.dim();
        let mut worst = (1.0f32, 1.0f32);
        for (i, expected) in theirs.embeddings.iter().enumerate() {
            let vector = &ours[i * dim..(i + 1) * dim];
            worst.0 = worst.0.min(cosine(vector, expected));
            worst.1 = worst.1.min(cosine(vector, &full[i * dim..(i + 1) * dim]));
        }
        assert!(
            worst.0 >= 0.9995,
            "against sentence-transformers bfloat16: {worst:?}"
        );
        assert!(
            worst.1 < 0.99999,
            "bfloat16 equals float32: the type is not used ({worst:?})"
        );
    }

    /// A small token budget splits the texts into more passes; vectors do not change.
    #[test]
    fn a_token_budget_changes_the_batches_not_the_vectors() {
        let fixture = fixture();
        let texts: Vec<&str> = fixture.texts.iter().map(String::as_str).collect();
        let wide = model().encode(&texts).unwrap().vectors;
        let narrow = model()
            .with_max_batch_tokens(16)
            .encode(&texts)
            .unwrap()
            .vectors;
        let dim = model().dim();
        for (i, (a, b)) in wide.chunks(dim).zip(narrow.chunks(dim)).enumerate() {
            assert!(cosine(a, b) >= 0.99999, "text {i}");
        }
    }

    /// Passes cover every text once, in order, within the cap and, padded, the budget
    /// (a text over the budget alone).
    #[test]
    fn token_batches_keep_the_cap_and_the_budget() {
        let lengths = [1, 2, 2, 3, 5, 8, 8, 9, 40];
        let order: Vec<usize> = (0..lengths.len()).collect();
        for (cap, budget) in [(4, 16), (2, 100), (32, 10), (1, 1), (32, 1000)] {
            let batches = token_batches(&order, |i| lengths[i], cap, budget);
            let flat: Vec<usize> = batches.concat();
            assert_eq!(flat, order);
            for batch in &batches {
                let padded = batch.len() * batch.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                assert!(batch.len() <= cap, "{batches:?}");
                assert!(
                    batch.len() == 1 || padded <= budget,
                    "{cap} {budget}: {batches:?}"
                );
            }
        }
        assert_eq!(token_batches(&order, |i| lengths[i], 4, 16).len(), 5);
    }

    #[test]
    fn counts_the_tokens_past_the_length_limit() {
        let model = model();
        let long = "the printer on floor two is offline again. ".repeat(60);
        let mut whole = model.tokenizer.clone();
        whole.with_truncation(None).unwrap();
        let tokens = whole.encode(long.as_str(), false).unwrap().len();
        let encoded = model.encode(&["short text", &long]).unwrap();
        // MiniLM's limit is 256 tokens, [CLS] and [SEP] among them.
        assert!(tokens > 254, "{tokens}");
        assert_eq!(encoded.cut_tokens, [0, (tokens - 254) as u32]);
        assert_eq!(model.fingerprint().len(), 16);
    }

    #[test]
    fn missing_and_wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = BertEncoder::load(dir.path(), &Device::Cpu, 4)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#,
        )
        .unwrap();
        let err = BertEncoder::load(dir.path(), &Device::Cpu, 4)
            .err()
            .unwrap();
        assert!(matches!(err, EncoderError::NotBert { .. }), "{err}");
        let source = cached_model_dir("minilm-l6-v2");
        std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
        let err = BertEncoder::load(dir.path(), &Device::Cpu, 4)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
