//! `abridge search`: a query against a job's index, printed as a table or JSON.

use std::io::Write;
use std::sync::Arc;

use abridge_models::encoder::EncoderWorker;
use abridge_models::models::bert::BertEncoder;
use abridge_operators::OperatorError;
use abridge_operators::index::TicketIndex;
use abridge_pipeline::PipelineError;
use abridge_pipeline::job::Job;
use abridge_pipeline::search::{self as index_search, SearchMode};
use anyhow::Context;
use candle_core::Device;

use crate::args::{HitFormat, SearchArgs, job_or_default};

pub async fn search(args: SearchArgs) -> anyhow::Result<()> {
    let (dir, model, batch_size) = match (&args.index, &args.job) {
        (Some(dir), _) => (dir.clone(), None, 32),
        (None, job) => {
            let path = job_or_default(job.as_ref(), "--job or --index DIR")?;
            let job = Job::load(&path, &[]).map_err(PipelineError::from)?;
            let Some(index) = &job.config.index else {
                return Err(PipelineError::Usage(format!(
                    "job {} has no [index] section, so there is nothing to search",
                    path.display()
                ))
                .into());
            };
            let embed = job.config.embed.as_ref();
            (
                index.path.clone(),
                embed.map(|e| e.model.clone()),
                embed.map_or(32, |e| e.batch_size),
            )
        }
    };
    let index = TicketIndex::open(&dir).map_err(index_search::index_error)?;
    let encoder = if args.mode == SearchMode::Bm25 {
        None
    } else {
        let model = model.unwrap_or_else(|| index.meta().model.clone());
        let encoder = BertEncoder::load(&model, &Device::Cpu, batch_size)
            .and_then(|e| EncoderWorker::spawn(Arc::new(e)))
            .map_err(|e| PipelineError::Model {
                job: dir.clone(),
                source: Box::new(OperatorError::Encoder(Box::new(e))),
            })
            .context("vector search embeds the query (or use --mode bm25)")?;
        let meta = index.meta();
        if let Some(reason) = meta.mismatch(encoder.dim(), &model, encoder.fingerprint()) {
            return Err(PipelineError::Usage(format!(
                "index {}: {reason}; search it with the encoder that made it, or use --mode bm25",
                dir.display()
            ))
            .into());
        }
        Some(encoder)
    };
    let hits =
        index_search::search(&index, encoder.as_ref(), &args.query, args.k, args.mode).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout());
    match args.format {
        HitFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &hits)?;
            writeln!(out)?;
        }
        HitFormat::Table => {
            if hits.is_empty() {
                eprintln!("no match in {} for {:?}", dir.display(), args.query);
            }
            for (rank, hit) in hits.iter().enumerate() {
                let mut line = hit
                    .title
                    .clone()
                    .map(|t| format!("{t} — "))
                    .unwrap_or_default();
                line.push_str(&hit.text);
                let line: String = line.split_whitespace().collect::<Vec<_>>().join(" ");
                writeln!(
                    out,
                    "{:>3}  {:>8.4}  {:<12}  {:<12}  {}",
                    rank + 1,
                    hit.score,
                    hit.id,
                    hit.topic.as_deref().unwrap_or("-"),
                    clip(&line, 90)
                )?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// `text` cut to `chars` characters, with an ellipsis when cut.
fn clip(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}
