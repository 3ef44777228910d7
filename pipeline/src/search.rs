//! `abridge search`: a query against a job's index by words, by meaning, or both. (The
//! index is kept in step with the table by `table::index`.)

use abridge_models::encoder::EncoderWorker;
use abridge_operators::index::{Hit, IndexError, TicketIndex, reciprocal_rank_fusion};

use crate::error::{PipelineError, encoder_error};

/// An index error as a pipeline error (what went wrong already names the folder).
pub fn index_error(source: IndexError) -> PipelineError {
    PipelineError::Index(Box::new(source))
}

/// How `abridge search` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SearchMode {
    /// Words in common (tantivy BM25 over titles and texts).
    Bm25,
    /// Meaning: cosine between the query's vector and the tickets'.
    Vector,
    /// Both, fused by reciprocal rank.
    Hybrid,
}

/// Searches `index`; `encoder` is needed for vector and hybrid modes.
pub async fn search(
    index: &TicketIndex,
    encoder: Option<&EncoderWorker>,
    query: &str,
    k: usize,
    mode: SearchMode,
) -> Result<Vec<Hit>, PipelineError> {
    let vector = match (mode, encoder) {
        (SearchMode::Bm25, _) => Vec::new(),
        (_, None) => {
            return Err(PipelineError::Usage(format!(
                "{mode:?} search needs the index's encoder; use --mode bm25"
            )));
        }
        (_, Some(encoder)) => encoder
            .encode(vec![query.to_string()])
            .await
            .map_err(|e| encoder_error(&index.meta().model, e))?,
    };
    let hits = match mode {
        SearchMode::Bm25 => index.search_bm25(query, k),
        SearchMode::Vector => index.search_vector(&vector, k),
        SearchMode::Hybrid => {
            // Fuse deeper lists than asked for, so that a ticket ranked well by one
            // method and moderately by the other can still surface.
            let depth = (k * 4).max(50);
            let lexical = index.search_bm25(query, depth).map_err(index_error)?;
            let semantic = index.search_vector(&vector, depth).map_err(index_error)?;
            Ok(reciprocal_rank_fusion(&[lexical, semantic], k))
        }
    };
    hits.map_err(index_error)
}
