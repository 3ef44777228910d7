//! Sentence encoders: text in, one vector per text out.
//!
//! Models sit behind the small [`Encoder`] trait, with the engine-specific code in one
//! module each ([`crate::models::bert`]: BERT-family checkpoints on candle). Encoding is blocking CPU or
//! GPU work, so stages reach an encoder through an [`EncoderWorker`]: a dedicated thread
//! fed by a channel, each request answered on a oneshot, as text-embeddings-inference
//! wraps its candle backend. The async runtime never blocks on a forward pass.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

/// Errors of loading or running an encoder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncoderError {
    /// A file the model folder must have is missing or unreadable.
    #[error("model folder {}: cannot read {file}: {reason}", dir.display())]
    MissingFile {
        /// The model folder.
        dir: PathBuf,
        /// The file's name inside it.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// A file of the model folder is there but malformed.
    #[error("model folder {}: {file}: {reason}", dir.display())]
    BadFile {
        /// The model folder.
        dir: PathBuf,
        /// The file's name inside it.
        file: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The checkpoint is not an architecture this encoder implements.
    #[error("model folder {}: architecture {found} is not a BERT-family encoder (BERT, GTE, BGE, MiniLM, e5)", dir.display())]
    NotBert {
        /// The model folder.
        dir: PathBuf,
        /// The `model_type`/`architectures` found in config.json.
        found: String,
    },
    /// Tokenizing a text failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The encoder's compute threads could not be started.
    #[error("cannot start encoder threads: {0}")]
    Threads(String),
    /// The encoder's worker thread is gone (it panicked or was shut down).
    #[error("encoder worker stopped")]
    WorkerGone,
}

/// A sentence encoder.
pub trait Encoder: Send + Sync {
    /// Length of every vector.
    fn dim(&self) -> usize;

    /// A digest of the model (weights, tokenizer, pooling): vectors of two encoders are
    /// comparable only when their fingerprints are equal, whatever their dimensions.
    fn fingerprint(&self) -> &str;

    /// Encodes `texts` (blocking): one L2-normalized vector per text in input order, and
    /// how many tokens of each the model's length limit left out.
    fn encode(&self, texts: &[&str]) -> Result<Encoded, EncoderError>;

    /// Number of tokens the model sees for `text`, special tokens excluded: the length
    /// that length-dependent thresholds are measured in.
    fn count_tokens(&self, text: &str) -> Result<usize, EncoderError>;
}

/// What [`Encoder::encode`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    /// `texts.len() * dim()` floats, one vector per text.
    pub vectors: Vec<f32>,
    /// Per text, the tokens past the model's length limit (`max_seq_length`), which the
    /// vector does not see; 0 when the whole text fit.
    pub cut_tokens: Vec<u32>,
}

type Request = (Vec<String>, oneshot::Sender<Result<Encoded, EncoderError>>);

/// A handle on an encoder running on its own thread. Cloning gives another handle on the
/// same thread; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct EncoderWorker {
    requests: mpsc::Sender<Request>,
    /// For the cheap, thread-safe calls (dimensions, tokenizing) that need no queue.
    encoder: Arc<dyn Encoder>,
}

impl EncoderWorker {
    /// Moves `encoder` onto a new thread.
    pub fn spawn(encoder: Arc<dyn Encoder>) -> Result<Self, EncoderError> {
        let shared = Arc::clone(&encoder);
        let (requests, mut inbox) = mpsc::channel::<Request>(4);
        std::thread::Builder::new()
            .name("abridge-encoder".into())
            .spawn(move || {
                while let Some((texts, reply)) = inbox.blocking_recv() {
                    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                    let _ = reply.send(encoder.encode(&refs));
                }
            })
            .map_err(|_| EncoderError::WorkerGone)?;
        Ok(Self {
            requests,
            encoder: shared,
        })
    }

    /// Length of every vector.
    pub fn dim(&self) -> usize {
        self.encoder.dim()
    }

    /// The model's [`Encoder::fingerprint`].
    pub fn fingerprint(&self) -> &str {
        self.encoder.fingerprint()
    }

    /// Tokens of `text` as [`Encoder::count_tokens`] counts them (on the caller's thread).
    pub fn count_tokens(&self, text: &str) -> Result<usize, EncoderError> {
        self.encoder.count_tokens(text)
    }

    /// Encodes `texts` on the worker thread: their vectors, `texts.len() * dim()` floats.
    pub async fn encode(&self, texts: Vec<String>) -> Result<Vec<f32>, EncoderError> {
        Ok(self.encode_counting_cuts(texts).await?.vectors)
    }

    /// Encodes `texts` on the worker thread, with the tokens cut from each.
    pub async fn encode_counting_cuts(&self, texts: Vec<String>) -> Result<Encoded, EncoderError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((texts, reply))
            .await
            .map_err(|_| EncoderError::WorkerGone)?;
        answer.await.map_err(|_| EncoderError::WorkerGone)?
    }
}
