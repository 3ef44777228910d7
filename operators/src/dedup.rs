//! `dedup`: drops rows whose id was already seen in this run, keeping the first.
//!
//! Inputs exported from ticket systems often repeat a ticket (re-sent, re-opened, two
//! exports overlapping). Summarizing it twice wastes model time and makes the output's
//! `id` ambiguous, so later occurrences are dropped and counted. Each distinct id costs a
//! 128-bit digest in a hash set, 17 to 35 bytes with the table's slack: ~4 MB for a 100k
//! nightly run, ~35 MB for a million tickets (measured with scripts/bench-pipeline).
//!
//! A resumed run starts with the ids its earlier attempts committed already seen: their
//! rows are skipped (counted once each as done) and any later repeat is a duplicate, as it
//! would have been in one uninterrupted run.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use abridge_schemas::TicketColumn;
use arrow::array::{Array, BooleanBuilder, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::{
    BatchTransform, Operator, OperatorError, OperatorMetrics, SendableRecordBatchStream,
    map_batches,
};

/// The `dedup` stage over a normalized stream (one with a Utf8 `id` column).
#[derive(Debug)]
pub struct Deduplicate {
    schema: SchemaRef,
    committed: HashSet<u128>,
}

impl Deduplicate {
    /// A deduplicating stage for streams of `schema`, which must have a Utf8 `id` column.
    pub fn try_new(schema: SchemaRef) -> Result<Self, OperatorError> {
        schema.index_of(TicketColumn::Id.name())?;
        Ok(Self {
            schema,
            committed: HashSet::new(),
        })
    }

    /// Treats `ids` as committed by earlier attempts of the run.
    pub fn resuming<'a>(mut self, ids: impl IntoIterator<Item = &'a str>) -> Self {
        self.committed.extend(ids.into_iter().map(digest));
        self
    }
}

impl Operator for Deduplicate {
    fn name(&self) -> &'static str {
        "dedup"
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn execute(
        &self,
        input: SendableRecordBatchStream,
        metrics: OperatorMetrics,
    ) -> Result<SendableRecordBatchStream, OperatorError> {
        // Each execution gets its own set of seen ids: one run, one set.
        let state = Arc::new(SeenIds {
            schema: Arc::clone(&self.schema),
            seen: Mutex::new(Seen {
                ids: self.committed.clone(),
                committed_unmet: self.committed.clone(),
            }),
        });
        Ok(map_batches(state, input, metrics))
    }
}

#[derive(Debug)]
struct SeenIds {
    schema: SchemaRef,
    /// Only ever locked by the one task polling the stream; the mutex is for `Sync`.
    seen: Mutex<Seen>,
}

#[derive(Debug)]
struct Seen {
    /// Every id seen or committed.
    ids: HashSet<u128>,
    /// Committed ids not met in the input yet: the first meeting is a skip, later ones
    /// are duplicates.
    committed_unmet: HashSet<u128>,
}

impl BatchTransform for SeenIds {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn transform(
        &self,
        batch: RecordBatch,
        metrics: &OperatorMetrics,
    ) -> Result<RecordBatch, OperatorError> {
        let ids = batch
            .column_by_name(TicketColumn::Id.name())
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| {
                arrow::error::ArrowError::SchemaError("dedup: `id` is not a Utf8 column".into())
            })?;
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| OperatorError::WorkerGone("dedup"))?;
        let mut keep = BooleanBuilder::with_capacity(ids.len());
        let (mut dropped, mut skipped) = (0, 0);
        for id in ids.iter() {
            // Rows without an id already carry an error; they are kept so that they are seen.
            let first = id.is_none_or(|id| {
                let id = digest(id);
                if seen.ids.insert(id) {
                    return true;
                }
                if seen.committed_unmet.remove(&id) {
                    skipped += 1;
                } else {
                    dropped += 1;
                }
                false
            });
            keep.append_value(first);
        }
        metrics.add_dropped(dropped);
        metrics.add_skipped(skipped);
        if dropped + skipped == 0 {
            return Ok(batch);
        }
        Ok(filter_record_batch(&batch, &keep.finish())?)
    }
}

/// A 128-bit digest of a string: what sets of ids and content hashes hold.
pub(crate) fn digest(id: &str) -> u128 {
    let hash = blake3::hash(id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash.as_bytes()[..16]);
    u128::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};
    use futures::TryStreamExt;

    fn stream_of(schema: &SchemaRef, batches: Vec<RecordBatch>) -> SendableRecordBatchStream {
        let stream = futures::stream::iter(batches.into_iter().map(Ok));
        Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                Arc::clone(schema),
                stream,
            ),
        )
    }

    proptest::proptest! {
        /// Whatever the ids and however they are split into batches, the output is the
        /// input with every repeated non-null id after its first occurrence removed.
        #[test]
        fn output_is_first_occurrences_in_order(
            ids in proptest::collection::vec(proptest::option::weighted(0.9, 0u8..20), 0..200),
            cuts in proptest::collection::vec(1usize..50, 1..10),
        ) {
            let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, true)]));
            let strings: Vec<Option<String>> = ids.iter().map(|i| i.map(|i| i.to_string())).collect();
            let mut batches = Vec::new();
            let mut start = 0;
            for cut in cuts.iter().cycle() {
                if start >= strings.len() {
                    break;
                }
                let end = (start + cut).min(strings.len());
                let array = StringArray::from(strings[start..end].to_vec());
                batches.push(RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(array)]).unwrap());
                start = end;
            }
            let mut seen = HashSet::new();
            let expected: Vec<Option<String>> = strings
                .iter()
                .filter(|id| id.as_ref().is_none_or(|id| seen.insert(id.clone())))
                .cloned()
                .collect();

            let op = Deduplicate::try_new(Arc::clone(&schema)).unwrap();
            let metrics = OperatorMetrics::default();
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let out: Vec<RecordBatch> = runtime
                .block_on(op.execute(stream_of(&schema, batches), metrics.clone()).unwrap().try_collect())
                .unwrap();
            let got: Vec<Option<String>> = out
                .iter()
                .flat_map(|b| {
                    let ids = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                    ids.iter().map(|v| v.map(str::to_string)).collect::<Vec<_>>()
                })
                .collect();
            proptest::prop_assert_eq!(&got, &expected);
            proptest::prop_assert_eq!(metrics.snapshot().rows_dropped as usize, strings.len() - expected.len());
        }
    }

    #[tokio::test]
    async fn keeps_first_occurrence_across_batches() -> Result<(), OperatorError> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("n", DataType::Utf8, true),
        ]));
        let batch = |ids: Vec<Option<&str>>, n: Vec<&str>| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(StringArray::from(ids)),
                    Arc::new(StringArray::from(n)),
                ],
            )
        };
        let input = || {
            vec![
                batch(vec![Some("a"), Some("b"), Some("a")], vec!["1", "2", "3"]),
                batch(
                    vec![None, Some("b"), None, Some("c")],
                    vec!["4", "5", "6", "7"],
                ),
            ]
        };
        let stream = stream_of(&schema, input().into_iter().collect::<Result<_, _>>()?);
        let op = Deduplicate::try_new(Arc::clone(&schema))?;
        let metrics = OperatorMetrics::default();
        let out: Vec<RecordBatch> = op.execute(stream, metrics.clone())?.try_collect().await?;
        let kept: Vec<String> = out
            .iter()
            .flat_map(|b| {
                let n = b.column(1).as_any().downcast_ref::<StringArray>().cloned();
                n.map(|n| n.iter().flatten().map(str::to_string).collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(kept, ["1", "2", "4", "6", "7"]);
        let m = metrics.snapshot();
        assert_eq!((m.rows_in, m.rows_out, m.rows_dropped), (7, 5, 2));

        // Resuming after "a" and "b" were committed: each is skipped once, its repeats
        // are duplicates, and what remains is what the uninterrupted run had left.
        let stream = stream_of(&schema, input().into_iter().collect::<Result<_, _>>()?);
        let op = Deduplicate::try_new(Arc::clone(&schema))?.resuming(["a", "b", "z"]);
        let metrics = OperatorMetrics::default();
        let out: Vec<RecordBatch> = op.execute(stream, metrics.clone())?.try_collect().await?;
        let rows: usize = out.iter().map(RecordBatch::num_rows).sum();
        let m = metrics.snapshot();
        assert_eq!((rows, m.rows_skipped, m.rows_dropped), (3, 2, 2));
        Ok(())
    }
}
