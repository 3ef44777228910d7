//! Where abridge's log events go: notes, progress lines, signals and errors are `tracing`
//! events (from the library and the binary), written to stderr as human lines or, with
//! `--log-format json`, as one JSON object per line with their fields (run id, row
//! counts, rates) for schedulers that collect logs. Other crates' events (mistral.rs logs
//! its loading at info) are left out.

use std::fmt;

use clap::ValueEnum;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// How log events are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Lines for people: the message, with `warning:` or `error:` before it.
    Text,
    /// One JSON object per line: timestamp, level, target, message and the event's fields.
    Json,
}

/// Sends abridge's events at info and above to stderr in `format`.
pub fn init(format: LogFormat) {
    let ours = Targets::new()
        .with_target("abridge", Level::INFO)
        .with_target("abridge_pipeline", Level::INFO)
        .with_target("abridge_operators", Level::INFO)
        .with_target("abridge_models", Level::INFO);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(ours);
    // Setting the global subscriber fails only when one is set already: then it stays.
    let _ = match format {
        LogFormat::Text => registry.with(layer.event_format(Human)).try_init(),
        LogFormat::Json => registry
            .with(layer.json().flatten_event(true).with_current_span(false))
            .try_init(),
    };
}

/// An event as a person reads it: its message only (its fields are in the message too).
struct Human;

impl<S, N> FormatEvent<S, N> for Human
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        match *event.metadata().level() {
            Level::ERROR => write!(writer, "error: ")?,
            Level::WARN => write!(writer, "warning: ")?,
            _ => {}
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        writeln!(writer, "{}", message.0)
    }
}

/// The `message` field of an event.
struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            use fmt::Write;
            let _ = write!(self.0, "{value:?}");
        }
    }
}
