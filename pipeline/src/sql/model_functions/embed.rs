//! `embed(text)`: the job's encoder worker, as a run's embed stage uses it.

use std::path::Path;
use std::time::Instant;

use arrow::array::{Array, StringArray};
use datafusion::common::exec_datafusion_err;
use datafusion::error::{DataFusionError, Result};

use super::{Models, Results, embed_key, lock};
use crate::sql::result_cache::{Answer, Key};

impl Models {
    pub(super) async fn embed(&self, texts: &StringArray, counting: bool) -> Result<Results> {
        let rows = texts.len();
        let mut results = Results::new(rows);
        let config = self.embed_config().map_err(DataFusionError::Execution)?;
        let fingerprint = self
            .encoder_identity(config)
            .map_err(|e| exec_datafusion_err!("embed(): {e}"))?;
        let group: Vec<usize> = (0..rows).filter(|&r| texts.is_valid(r)).collect();
        let keys: Vec<Key> = group
            .iter()
            .map(|&r| embed_key(&fingerprint, texts.value(r)))
            .collect();
        // The stand-in's length is read from the model's config only while counting: not
        // on every part of a query that calls the encoder.
        let dim = match counting {
            true => embedding_dim(&config.model)?,
            false => 0,
        };
        let zeros = |_: &Key| Answer::Vector(vec![0.0; dim].into());
        let todo = self.look_up(&group, &keys, &mut results, counting, &zeros);
        if todo.is_empty() {
            return Ok(results);
        }
        let encoder = self
            .encoder
            .get_or_try_init(|| config.load_encoder())
            .await
            .map_err(|e| exec_datafusion_err!("embed(): {e}"))?;
        let inputs: Vec<String> = todo
            .iter()
            .map(|&(i, _)| texts.value(group[i]).to_string())
            .collect();
        let started = Instant::now();
        let encoded = encoder.encode(inputs).await;
        let elapsed = started.elapsed();
        let dim = encoder.dim();
        let answers: Vec<_> = match encoded {
            Ok(vectors) => todo
                .iter()
                .zip(vectors.chunks(dim))
                .map(|(&(_, k), v)| Ok((k, Answer::Vector(v.into()))))
                .collect(),
            Err(e) => todo.iter().map(|_| Err(format!("embed: {e}"))).collect(),
        };
        self.record(&group, &keys, &todo, answers, &mut results);
        lock(&self.accounting).model_ms += elapsed.as_millis() as u64;
        Ok(results)
    }
}

/// The vector length of the encoder in `dir`: its config.json's `hidden_size` (what
/// abridge's BERT encoder returns), read without loading the model.
pub(super) fn embedding_dim(dir: &Path) -> Result<usize> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| exec_datafusion_err!("embed(): {}: {e}", path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| exec_datafusion_err!("embed(): {}: {e}", path.display()))?;
    config
        .get("hidden_size")
        .and_then(serde_json::Value::as_i64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| exec_datafusion_err!("embed(): {}: no hidden_size", path.display()))
}
