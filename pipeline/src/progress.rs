//! Progress of a running job: a live bar on a terminal, periodic log lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::executor::Progress;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar redrawn in place (stderr is a terminal).
    Bar,
    /// A log line every so often (stderr is a file or pipe).
    Log,
    /// Nothing.
    Off,
}

impl ProgressMode {
    /// A bar on a terminal, log lines elsewhere, nothing when `quiet`.
    pub fn detect(quiet: bool) -> Self {
        if quiet {
            ProgressMode::Off
        } else if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Log
        }
    }
}

/// A running progress display; [`ProgressReporter::finish`] stops it.
pub struct ProgressReporter {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl ProgressReporter {
    /// Starts showing `progress` in `mode`.
    pub fn start(progress: Progress, mode: ProgressMode) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        if mode == ProgressMode::Off {
            return Self { stop, task: None };
        }
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let bar = (mode == ProgressMode::Bar).then(|| {
                let bar = ProgressBar::with_draw_target(
                    Some(progress.expected_rows),
                    ProgressDrawTarget::stderr_with_hz(5),
                );
                let style = ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} read · {msg} · ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar
            });
            let mut last_log = Instant::now();
            loop {
                let tick = tokio::time::sleep(Duration::from_millis(200));
                tokio::select! {
                    _ = tick => {}
                    _ = stopped.changed() => break,
                }
                let read = progress.read.snapshot().rows_out;
                let written = progress.written.snapshot().rows_out;
                let rate = read as f64 / started.elapsed().as_secs_f64().max(1e-3);
                match &bar {
                    Some(bar) => {
                        bar.set_position(read);
                        bar.set_message(format!("{written} written · {rate:.0} rows/s"));
                    }
                    None if last_log.elapsed() >= LOG_EVERY => {
                        last_log = Instant::now();
                        let expected = progress.expected_rows;
                        let rows_per_s = rate.round();
                        tracing::info!(
                            read,
                            expected,
                            written,
                            rows_per_s,
                            "progress: {read}/{expected} rows read, {written} written, \
                             {rows_per_s} rows/s"
                        );
                    }
                    None => {}
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Stops the display and clears the bar.
    pub async fn finish(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}
