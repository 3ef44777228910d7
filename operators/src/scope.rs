//! `scope`: keeps the rows this run is for: its shard's, and (incremental nightly runs) those
//! not already summarized unchanged by an earlier run.
//!
//! Shards split by a stable hash of the ticket id (the first 8 bytes of its BLAKE3 digest,
//! modulo the shard count), so a ticket always lands in the same shard whatever the input's
//! order or files, and the shards of a job together hold every row exactly once. Rows
//! without an id (they carry an error already) go to shard 0.
//!
//! Done tickets are given as id → content hash digests; a ticket whose text changed since
//! has another hash and is processed again.

use std::collections::HashMap;
use std::sync::Arc;

use abridge_schemas::TicketColumn;
use abridge_schemas::output::CONTENT_HASH;
use arrow::array::{Array, BooleanBuilder, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::dedup::digest;
use crate::filter::string_column;
use crate::{BatchTransform, OperatorError, StageCounters, TransformStage};

/// One of `count` shards, numbered from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard's number, below `count`.
    pub index: u32,
    /// How many shards the job is split into (at least 1).
    pub count: u32,
}

impl Shard {
    /// The shard that row `id` belongs to.
    pub fn of(id: Option<&str>, count: u32) -> u32 {
        let Some(id) = id else { return 0 };
        let hash = blake3::hash(id.as_bytes());
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&hash.as_bytes()[..8]);
        (u64::from_le_bytes(bytes) % u64::from(count.max(1))) as u32
    }
}

/// Tickets summarized by earlier runs: id digest → content hash digest.
#[derive(Debug, Clone, Default)]
pub struct DoneTickets(HashMap<u128, u128>);

impl DoneTickets {
    /// Records that ticket `id` was summarized with content `content_hash`; a later call
    /// for the same id (a later run) replaces it.
    pub fn insert(&mut self, id: &str, content_hash: &str) {
        self.0.insert(digest(id), digest(content_hash));
    }

    /// How many tickets are recorded.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn contains(&self, id: &str, content_hash: &str) -> bool {
        self.0.get(&digest(id)) == Some(&digest(content_hash))
    }
}

/// The `scope` stage; see the module documentation.
#[derive(Debug)]
pub struct RunScope {
    schema: SchemaRef,
    shard: Option<Shard>,
    done: Arc<DoneTickets>,
}

impl RunScope {
    /// The stage's name; its skipped rows are those earlier runs did (`skip_done`).
    pub const NAME: &'static str = "scope";

    /// The stage over normalized rows of `schema` (Utf8 `id`, and `content_hash`
    /// when `done` is not empty).
    pub fn try_new(
        schema: &SchemaRef,
        shard: Option<Shard>,
        done: DoneTickets,
    ) -> Result<TransformStage<Self>, OperatorError> {
        schema.index_of(TicketColumn::Id.name())?;
        if !done.is_empty() {
            schema.index_of(CONTENT_HASH)?;
        }
        Ok(TransformStage::new(
            Self::NAME,
            Self {
                schema: Arc::clone(schema),
                shard,
                done: Arc::new(done),
            },
        ))
    }
}

fn strings<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray, OperatorError> {
    string_column(batch, name)
        .ok_or_else(|| OperatorError::StageSchema(format!("scope: `{name}` is not a Utf8 column")))
}

impl BatchTransform for RunScope {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn transform(
        &self,
        batch: RecordBatch,
        metrics: &StageCounters,
    ) -> Result<RecordBatch, OperatorError> {
        let ids = strings(&batch, TicketColumn::Id.name())?;
        let hashes = match self.done.is_empty() {
            true => None,
            false => Some(strings(&batch, CONTENT_HASH)?),
        };
        let mut keep = BooleanBuilder::with_capacity(batch.num_rows());
        let (mut elsewhere, mut skipped) = (0, 0);
        for row in 0..batch.num_rows() {
            let id = ids.is_valid(row).then(|| ids.value(row));
            let mine = self
                .shard
                .is_none_or(|shard| Shard::of(id, shard.count) == shard.index);
            let done = mine
                && match (id, hashes) {
                    (Some(id), Some(hashes)) if hashes.is_valid(row) => {
                        self.done.contains(id, hashes.value(row))
                    }
                    _ => false,
                };
            elsewhere += usize::from(!mine);
            skipped += usize::from(done);
            keep.append_value(mine && !done);
        }
        metrics.add_elsewhere(elsewhere);
        metrics.add_skipped(skipped);
        if elsewhere + skipped == 0 {
            return Ok(batch);
        }
        Ok(filter_record_batch(&batch, &keep.finish())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(ids: &[Option<&str>], hashes: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new(CONTENT_HASH, DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(StringArray::from(hashes.to_vec())),
            ],
        )
        .unwrap()
    }

    fn ids(batch: &RecordBatch) -> Vec<Option<String>> {
        strings(batch, "id")
            .unwrap()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect()
    }

    proptest::proptest! {
        /// Every row lands in exactly one of n shards, the same one whatever else is in
        /// the batch.
        #[test]
        fn shards_partition_the_rows(
            raw in proptest::collection::vec(proptest::option::weighted(0.95, "[a-z0-9-]{0,12}"), 0..100),
            count in 1u32..6,
        ) {
            let rows: Vec<Option<&str>> = raw.iter().map(|r| r.as_deref()).collect();
            let hashes = vec!["h"; rows.len()];
            let input = batch(&rows, &hashes);
            let mut union = Vec::new();
            let mut elsewhere = 0;
            for index in 0..count {
                let stage = RunScope::try_new(&input.schema(), Some(Shard { index, count }), DoneTickets::default()).unwrap();
                let metrics = StageCounters::default();
                let out = stage.inner().transform(input.clone(), &metrics).unwrap();
                for (row, id) in ids(&out).into_iter().enumerate() {
                    proptest::prop_assert_eq!(Shard::of(id.as_deref(), count), index, "row {}", row);
                    union.push(id);
                }
                elsewhere += metrics.snapshot().rows_elsewhere;
            }
            let mut expected = ids(&input);
            expected.sort();
            union.sort();
            proptest::prop_assert_eq!(union, expected);
            proptest::prop_assert_eq!(elsewhere as usize, rows.len() * (count as usize - 1));
        }
    }

    #[test]
    fn done_tickets_are_skipped_unless_their_content_changed() {
        let mut done = DoneTickets::default();
        done.insert("a", "h1");
        done.insert("b", "h2");
        done.insert("a", "h3"); // a later run summarized a's new text
        let input = batch(
            &[Some("a"), Some("b"), Some("c"), None],
            &["h1", "h2", "h3", "h4"],
        );
        let stage = RunScope::try_new(&input.schema(), None, done).unwrap();
        let metrics = StageCounters::default();
        let out = stage.inner().transform(input, &metrics).unwrap();
        assert_eq!(
            ids(&out),
            [Some("a".to_string()), Some("c".to_string()), None]
        );
        assert_eq!(metrics.snapshot().rows_skipped, 1);
    }
}
