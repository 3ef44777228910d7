//! `dedup`: drops rows whose id was already seen in this run, keeping the first.
//!
//! Inputs exported from ticket systems often repeat a ticket (re-sent, re-opened, two
//! exports overlapping). Summarizing it twice wastes model time and makes the output's
//! `id` ambiguous, so later occurrences are dropped and counted. Each distinct id costs a
//! 128-bit digest in a hash set, 17 to 35 bytes with the table's slack: ~4 MB for a 100k
//! nightly run, ~35 MB for a million tickets (measured with scripts/bench-pipeline).
//!
//! A resumed run starts with the keys its earlier attempts committed already seen: their
//! rows are skipped (counted once each as done) and any later repeat is a duplicate, as it
//! would have been in one uninterrupted run.
//!
//! A row is known by its id, or, when it has none (null or blank: such rows carry an
//! error and are written so that they are seen), by its content hash ([`row_key`]). The
//! content is the one thing about such a row that is the same in every attempt of a run
//! and does not depend on where the input's reader split it into batches; two id-less
//! rows with the same title and text are the same ticket as far as anyone can tell, and
//! the second is a duplicate.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use abridge_schemas::TicketColumn;
use abridge_schemas::output::CONTENT_HASH;
use arrow::array::{Array, BooleanBuilder, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::{
    BatchTransform, Operator, OperatorError, SendableRecordBatchStream, StageCounters, map_batches,
};

/// The `dedup` stage over a normalized stream (one with a Utf8 `id` column).
#[derive(Debug)]
pub struct Deduplicate {
    schema: SchemaRef,
    committed: HashSet<u128>,
}

impl Deduplicate {
    /// A deduplicating stage for streams of `schema`, which must have Utf8 `id` and
    /// `content_hash` columns.
    pub fn try_new(schema: SchemaRef) -> Result<Self, OperatorError> {
        schema.index_of(TicketColumn::Id.name())?;
        schema.index_of(CONTENT_HASH)?;
        Ok(Self {
            schema,
            committed: HashSet::new(),
        })
    }

    /// Treats the rows of `keys` ([`row_key`]) as committed by earlier attempts of the run.
    pub fn resuming(mut self, keys: impl IntoIterator<Item = u128>) -> Self {
        self.committed.extend(keys);
        self
    }
}

impl Deduplicate {
    /// The stage's name; its skipped rows are those a resumed run had committed.
    pub const NAME: &'static str = "dedup";
}

impl Operator for Deduplicate {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn execute(
        &self,
        input: SendableRecordBatchStream,
        metrics: StageCounters,
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
        metrics: &StageCounters,
    ) -> Result<RecordBatch, OperatorError> {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| {
                    arrow::error::ArrowError::SchemaError(format!(
                        "dedup: `{name}` is not a Utf8 column"
                    ))
                })
        };
        let (ids, hashes) = (column(TicketColumn::Id.name())?, column(CONTENT_HASH)?);
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| OperatorError::WorkerGone("dedup"))?;
        let mut keep = BooleanBuilder::with_capacity(ids.len());
        let (mut dropped, mut skipped) = (0, 0);
        for row in 0..batch.num_rows() {
            let key = row_key(value(ids, row), value(hashes, row));
            let first = seen.ids.insert(key);
            if !first {
                if seen.committed_unmet.remove(&key) {
                    skipped += 1;
                } else {
                    dropped += 1;
                }
            }
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

/// Row `row` of `column`, or `None` where it is null.
pub(crate) fn value(column: &StringArray, row: usize) -> Option<&str> {
    column.is_valid(row).then(|| column.value(row))
}

/// The key a row is known by within a run: its id's digest, or for a row without an id
/// (null or blank) its content hash's, marked so that it cannot equal an id's.
pub fn row_key(id: Option<&str>, content_hash: Option<&str>) -> u128 {
    match id {
        Some(id) if !id.trim().is_empty() => digest(id),
        _ => digest(&format!("\0content:{}", content_hash.unwrap_or_default())),
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
    use crate::CountersSnapshot;
    use arrow::datatypes::{DataType, Field, Schema};
    use futures::TryStreamExt;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new(CONTENT_HASH, DataType::Utf8, true),
            Field::new("n", DataType::Utf8, true),
        ]))
    }

    /// `rows` of (id, content hash) cut into batches of the sizes `cuts` cycles through;
    /// column `n` numbers the rows.
    fn batches(
        rows: &[(Option<String>, String)],
        cuts: &[usize],
    ) -> Result<Vec<RecordBatch>, OperatorError> {
        let mut out = Vec::new();
        let mut start = 0;
        for cut in cuts.iter().cycle() {
            if start >= rows.len() {
                break;
            }
            let end = (start + cut.max(&1)).min(rows.len());
            let part = &rows[start..end];
            out.push(RecordBatch::try_new(
                schema(),
                vec![
                    Arc::new(StringArray::from_iter(part.iter().map(|r| r.0.clone()))),
                    Arc::new(StringArray::from_iter_values(part.iter().map(|r| &r.1))),
                    Arc::new(StringArray::from_iter_values(
                        (start..end).map(|n| n.to_string()),
                    )),
                ],
            )?);
            start = end;
        }
        Ok(out)
    }

    /// The row numbers (`n`) that come out of `op` over `input`, and its metrics.
    async fn kept(
        op: &Deduplicate,
        input: Vec<RecordBatch>,
    ) -> Result<(Vec<usize>, CountersSnapshot), OperatorError> {
        let stream = Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                schema(),
                futures::stream::iter(input.into_iter().map(Ok)),
            ),
        );
        let metrics = StageCounters::default();
        let out: Vec<RecordBatch> = op.execute(stream, metrics.clone())?.try_collect().await?;
        let mut numbers = Vec::new();
        for batch in &out {
            let n = batch
                .column(2)
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| OperatorError::StageSchema("n".into()))?;
            numbers.extend(n.iter().flatten().filter_map(|v| v.parse::<usize>().ok()));
        }
        Ok((numbers, metrics.snapshot()))
    }

    proptest::proptest! {
        /// Whatever the ids (some null or blank) and however the rows are split into
        /// batches, the output is the first occurrence of each key, in order; and a run
        /// resumed after any number of those rows were committed writes exactly the rest.
        #[test]
        fn first_occurrences_in_order_and_resumes_write_exactly_the_rest(
            ids in proptest::collection::vec(proptest::option::weighted(0.8, 0u8..24), 0..150),
            contents in proptest::collection::vec(0u8..5, 150),
            cuts in proptest::collection::vec(1usize..40, 1..8),
            committed_share in 0.0f64..=1.0,
        ) {
            // Ids 20..24 are blank: like null ones, known by their content.
            let rows: Vec<(Option<String>, String)> = ids
                .iter()
                .zip(&contents)
                .map(|(id, c)| (id.map(|i| if i >= 20 { " ".repeat(usize::from(i - 19)) } else { i.to_string() }), format!("h{c}")))
                .collect();
            let key = |r: &(Option<String>, String)| row_key(r.0.as_deref(), Some(&r.1));
            let mut seen = HashSet::new();
            let expected: Vec<usize> = (0..rows.len()).filter(|&i| seen.insert(key(&rows[i]))).collect();

            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let op = Deduplicate::try_new(schema()).unwrap();
            let (got, m) = runtime.block_on(kept(&op, batches(&rows, &cuts).unwrap())).unwrap();
            proptest::prop_assert_eq!(&got, &expected);
            proptest::prop_assert_eq!(m.rows_dropped as usize, rows.len() - expected.len());

            let done = (expected.len() as f64 * committed_share) as usize;
            let op = Deduplicate::try_new(schema()).unwrap()
                .resuming(expected[..done].iter().map(|&i| key(&rows[i])));
            let (rest, m) = runtime.block_on(kept(&op, batches(&rows, &cuts).unwrap())).unwrap();
            proptest::prop_assert_eq!(&rest, &expected[done..].to_vec());
            proptest::prop_assert_eq!(m.rows_skipped as usize, done);
            proptest::prop_assert_eq!((m.rows_skipped + m.rows_dropped) as usize, rows.len() - rest.len());
        }
    }

    #[tokio::test]
    async fn rows_without_an_id_are_known_by_their_content() -> Result<(), OperatorError> {
        let row = |id: Option<&str>, hash: &str| (id.map(str::to_string), hash.to_string());
        let rows = [
            row(Some("a"), "x"),
            row(None, "x"),
            row(Some("a"), "y"), // a repeated id, whatever its content
            row(Some(""), "x"),
            row(None, "y"),
            row(Some("b"), "y"),
        ];
        let (kept_rows, m) = kept(&Deduplicate::try_new(schema())?, batches(&rows, &[2])?).await?;
        // The null-id row of content x is kept and the blank-id one of the same content is
        // its duplicate; the null-id row of content y is another ticket.
        assert_eq!(kept_rows, [0, 1, 4, 5]);
        assert_eq!((m.rows_in, m.rows_out, m.rows_dropped), (6, 4, 2));
        Ok(())
    }
}
