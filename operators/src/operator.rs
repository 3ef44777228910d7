use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use futures::future::BoxFuture;

use crate::{OperatorError, SendableRecordBatchStream, StageCounters};

/// A pipeline stage: a stream of record batches in, a stream out.
///
/// The contract is DataFusion's: the output schema is known when the operator is built
/// (from its input schema), no work happens before the returned stream is first polled,
/// and failures of the whole stream travel as stream items. Failures of single rows do
/// not: such rows flow on with the reason in their `error` column.
pub trait Operator: Send + Sync {
    /// A short name for logs and run summaries (`normalize`, `dedup`, ...).
    fn name(&self) -> &'static str;

    /// The schema of every batch the output stream yields.
    fn schema(&self) -> SchemaRef;

    /// Wraps `input`; `metrics` receives this operator's counts as batches pass.
    fn execute(
        &self,
        input: SendableRecordBatchStream,
        metrics: StageCounters,
    ) -> Result<SendableRecordBatchStream, OperatorError>;
}

/// The simplest kind of stage: each output batch depends on one input batch alone.
/// [`map_batches`] turns one into a stream; most stages should be this.
pub trait BatchTransform: Send + Sync + 'static {
    /// The schema of every batch [`BatchTransform::transform`] returns.
    fn schema(&self) -> SchemaRef;

    /// Transforms one batch, counting failed or dropped rows in `metrics`.
    fn transform(
        &self,
        batch: RecordBatch,
        metrics: &StageCounters,
    ) -> Result<RecordBatch, OperatorError>;
}

/// An [`Operator`] that applies one [`BatchTransform`] to every batch: what the stateless
/// stages (`normalize`, `filter`, `index`) are. Their constructors return one of these.
pub struct TransformStage<T> {
    name: &'static str,
    transform: Arc<T>,
}

impl<T: BatchTransform> TransformStage<T> {
    /// The stage `name` applying `transform`.
    pub fn new(name: &'static str, transform: T) -> Self {
        Self {
            name,
            transform: Arc::new(transform),
        }
    }

    /// The transform itself (to apply it to a batch directly, as tests do).
    pub fn inner(&self) -> &T {
        &self.transform
    }
}

impl<T: BatchTransform> Operator for TransformStage<T> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn schema(&self) -> SchemaRef {
        self.transform.schema()
    }

    fn execute(
        &self,
        input: SendableRecordBatchStream,
        metrics: StageCounters,
    ) -> Result<SendableRecordBatchStream, OperatorError> {
        Ok(map_batches(Arc::clone(&self.transform), input, metrics))
    }
}

/// [`BatchTransform`] for stages whose work on a batch is asynchronous (a model behind a
/// worker thread or an engine: `topics`, `summarize`, `extract`). [`AsyncTransformStage`]
/// runs it on one batch at a time, in order.
pub trait AsyncBatchTransform: Send + Sync + 'static {
    /// The schema of every batch [`AsyncBatchTransform::transform`] returns.
    fn schema(&self) -> SchemaRef;

    /// Transforms one batch, counting failed or filtered rows in `metrics`.
    fn transform<'a>(
        &'a self,
        batch: RecordBatch,
        metrics: &'a StageCounters,
    ) -> BoxFuture<'a, Result<RecordBatch, OperatorError>>;
}

/// An [`Operator`] that applies one [`AsyncBatchTransform`] to every batch.
pub struct AsyncTransformStage<T> {
    name: &'static str,
    transform: Arc<T>,
}

impl<T: AsyncBatchTransform> AsyncTransformStage<T> {
    /// The stage `name` applying `transform`.
    pub fn new(name: &'static str, transform: T) -> Self {
        Self {
            name,
            transform: Arc::new(transform),
        }
    }

    /// The transform itself (to apply it to a batch outside a stream, as SQL does).
    pub fn inner(&self) -> &T {
        &self.transform
    }
}

impl<T: AsyncBatchTransform> Operator for AsyncTransformStage<T> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn schema(&self) -> SchemaRef {
        self.transform.schema()
    }

    fn execute(
        &self,
        input: SendableRecordBatchStream,
        metrics: StageCounters,
    ) -> Result<SendableRecordBatchStream, OperatorError> {
        let transform = Arc::clone(&self.transform);
        Ok(then_batches(
            self.transform.schema(),
            input,
            metrics,
            move |batch, metrics| {
                let transform = Arc::clone(&transform);
                async move { transform.transform(batch, &metrics).await }
            },
        ))
    }
}

/// Applies `transform` to every batch of `input`, counting rows and time in `metrics`.
pub fn map_batches<T: BatchTransform>(
    transform: Arc<T>,
    input: SendableRecordBatchStream,
    metrics: StageCounters,
) -> SendableRecordBatchStream {
    let schema = transform.schema();
    let stream = input.map(move |batch| {
        let batch = batch?;
        metrics.add_in(batch.num_rows());
        let started = Instant::now();
        let out = transform.transform(batch, &metrics);
        metrics.add_busy(started.elapsed());
        let out = out?;
        metrics.add_out(out.num_rows());
        Ok(out)
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, stream))
}

/// [`map_batches`] for [`AsyncTransformStage`]: `work` runs on one batch at a time, in
/// order, and receives the metrics to count its failed rows in.
fn then_batches<F, Fut>(
    schema: SchemaRef,
    input: SendableRecordBatchStream,
    metrics: StageCounters,
    work: F,
) -> SendableRecordBatchStream
where
    F: Fn(RecordBatch, StageCounters) -> Fut + Send + 'static,
    Fut: Future<Output = Result<RecordBatch, OperatorError>> + Send + 'static,
{
    let stream = input.then(move |batch| {
        let metrics = metrics.clone();
        let pending = batch.map(|batch| {
            metrics.add_in(batch.num_rows());
            work(batch, metrics.clone())
        });
        async move {
            let started = Instant::now();
            let out = pending?.await;
            metrics.add_busy(started.elapsed());
            let out = out?;
            metrics.add_out(out.num_rows());
            Ok(out)
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, stream))
}
