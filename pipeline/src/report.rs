//! The evaluation report: one self-contained HTML file (inline SVG, no script, nothing
//! fetched when it is opened), so that it can be attached to a ticket or mailed, and read
//! years later.
//!
//! What a reviewer looks at first: the per-run table, the distribution of each measure
//! with the alert thresholds drawn, ROUGE-L by topic, drift against compression (where
//! the alerts live), and the worst summaries with their text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use abridge_operators::quality::{
    ALERTS, AlertThresholds, COMPRESSION, DRIFT, ROUGE_L, ROUGE1, ROUGE2,
};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Float64Type;

use crate::error::PipelineError;
use crate::eval::{Comparison, Evaluation, text_column};

/// Run colours, in run order (colour-blind safe: Okabe–Ito).
const COLOURS: [&str; 6] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00",
];

/// One evaluated row, as the report needs it.
struct Row {
    run: usize,
    id: String,
    topic: String,
    text: String,
    summary: String,
    reference: String,
    measures: BTreeMap<&'static str, f64>,
    alerts: Vec<String>,
}

/// Writes the report of `evaluation` (and `comparison`, when given) to `path`.
pub fn write_report(
    path: &Path,
    evaluation: &Evaluation,
    comparison: Option<&Comparison>,
) -> Result<(), PipelineError> {
    let html = render(evaluation, comparison);
    std::fs::write(path, html).map_err(|source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn rows(evaluation: &Evaluation) -> Vec<Row> {
    let runs: Vec<&str> = evaluation.runs.iter().map(|r| r.run_id.as_str()).collect();
    let mut rows = Vec::new();
    for batch in &evaluation.batches {
        let text = |name: &str| text_column(batch, name);
        let (ids, run_ids, topics) = (text("id"), text("run_id"), text("topic"));
        let (texts, summaries, references) = (text("text"), text("summary"), text("reference"));
        let alerts = batch
            .column_by_name(ALERTS)
            .map(|a| a.as_list::<i32>().clone());
        for r in 0..batch.num_rows() {
            let Some(run) = runs.iter().position(|id| *id == run_ids[r]) else {
                continue;
            };
            let mut measures = BTreeMap::new();
            for name in [ROUGE1, ROUGE2, ROUGE_L, DRIFT, COMPRESSION] {
                if let Some(values) = batch.column_by_name(name) {
                    let values = values.as_primitive::<Float64Type>();
                    if values.is_valid(r) {
                        measures.insert(name, values.value(r));
                    }
                }
            }
            let alerts = alerts
                .as_ref()
                .filter(|a| a.is_valid(r))
                .map(|a| {
                    a.value(r)
                        .as_string::<i32>()
                        .iter()
                        .flatten()
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            rows.push(Row {
                run,
                id: ids[r].clone(),
                topic: topics[r].clone(),
                text: texts[r].clone(),
                summary: summaries[r].clone(),
                reference: references[r].clone(),
                measures,
                alerts,
            });
        }
    }
    rows
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn shorten(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_string();
    }
    let head: String = text.chars().take(chars).collect();
    format!("{head}…")
}

fn number(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.3}"))
}

fn render(evaluation: &Evaluation, comparison: Option<&Comparison>) -> String {
    // Drawn: the first run's thresholds (each run's are listed at the end).
    let thresholds = &evaluation
        .runs
        .first()
        .map(|r| r.thresholds)
        .unwrap_or_default();
    let rows = rows(evaluation);
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>abridge evaluation</title><style>{STYLE}</style></head><body>\
         <h1>abridge evaluation</h1><p class=\"where\">{}</p>",
        escape(&evaluation.dir.display().to_string())
    );

    // The runs at a glance.
    html.push_str(
        "<h2>Runs</h2><table><tr><th></th><th>run</th><th>summaries</th><th>no reference</th>\
         <th>ROUGE-1</th><th>ROUGE-2</th><th>ROUGE-L</th><th>drift</th><th>compression</th>\
         <th>alerts</th></tr>",
    );
    for (i, run) in evaluation.runs.iter().enumerate() {
        let mean = |k: &str| number(run.means.get(k).copied().flatten());
        let alerts: Vec<String> = run
            .alerts
            .iter()
            .map(|(name, n)| format!("{} {n}", escape(name)))
            .collect();
        let _ = write!(
            html,
            "<tr><td><span class=\"key\" style=\"background:{}\"></span></td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td></tr>",
            COLOURS[i % COLOURS.len()],
            escape(&run.run_id),
            run.summarized,
            run.without_reference,
            mean(ROUGE1),
            mean(ROUGE2),
            mean(ROUGE_L),
            mean(DRIFT),
            mean(COMPRESSION),
            if alerts.is_empty() {
                "none".to_string()
            } else {
                alerts.join(", ")
            }
        );
    }
    html.push_str("</table>");

    if let Some(c) = comparison {
        let _ = write!(
            html,
            "<h2>{} vs {}</h2><p>{} tickets summarized in both.</p><table><tr><th>measure</th>\
             <th>mean A</th><th>mean B</th><th>A higher</th><th>B higher</th><th>same</th></tr>",
            escape(&c.run_a),
            escape(&c.run_b),
            c.shared
        );
        let count = |v: Option<u64>| v.map_or_else(|| "–".to_string(), |v| v.to_string());
        for m in &c.measures {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&m.measure),
                number(m.mean_a),
                number(m.mean_b),
                count(m.a_wins),
                count(m.b_wins),
                count(m.ties)
            );
        }
        html.push_str("</table>");
    }

    // Distributions, thresholds drawn where the measure has them.
    html.push_str("<h2>Distributions</h2><div class=\"grid\">");
    let runs = evaluation.runs.len();
    let limits: [(&str, &str, Vec<f64>); 4] = [
        (ROUGE_L, "ROUGE-L F1", vec![]),
        (ROUGE1, "ROUGE-1 F1", vec![]),
        (
            DRIFT,
            "drift (cosine of text and summary)",
            vec![thresholds.drift_min],
        ),
        (
            COMPRESSION,
            "compression (summary / text characters)",
            vec![thresholds.compression_min, thresholds.compression_max],
        ),
    ];
    for (measure, title, lines) in &limits {
        let values: Vec<Vec<f64>> = (0..runs)
            .map(|run| {
                rows.iter()
                    .filter(|r| r.run == run)
                    .filter_map(|r| r.measures.get(measure).copied())
                    .collect()
            })
            .collect();
        let _ = write!(
            html,
            "<figure><figcaption>{}</figcaption>{}</figure>",
            escape(title),
            histogram(&values, lines)
        );
    }
    html.push_str("</div>");

    // ROUGE-L by topic.
    let mut topics: BTreeMap<&str, Vec<(f64, usize)>> = BTreeMap::new();
    for r in &rows {
        if let Some(&v) = r.measures.get(ROUGE_L) {
            let topic = if r.topic.is_empty() {
                "(none)"
            } else {
                &r.topic
            };
            let entry = topics.entry(topic).or_insert_with(|| vec![(0.0, 0); runs]);
            entry[r.run].0 += v;
            entry[r.run].1 += 1;
        }
    }
    if !topics.is_empty() {
        let _ = write!(
            html,
            "<h2>ROUGE-L by topic</h2><figure>{}</figure>",
            topic_bars(&topics)
        );
    }

    // Where the alerts are: drift against compression.
    let points: Vec<(f64, f64, usize)> = rows
        .iter()
        .filter_map(|r| {
            Some((
                *r.measures.get(COMPRESSION)?,
                *r.measures.get(DRIFT)?,
                r.run,
            ))
        })
        .collect();
    if !points.is_empty() {
        let _ = write!(
            html,
            "<h2>Drift against compression</h2><p>Each dot a summary; the shaded bands are \
             where alerts fire.</p><figure>{}</figure>",
            scatter(&points, thresholds)
        );
    }

    // The worst ten: lowest ROUGE-L (or drift, without references).
    let key = if rows.iter().any(|r| r.measures.contains_key(ROUGE_L)) {
        ROUGE_L
    } else {
        DRIFT
    };
    let mut worst: Vec<&Row> = rows
        .iter()
        .filter(|r| r.measures.contains_key(key))
        .collect();
    worst.sort_by(|a, b| a.measures[key].total_cmp(&b.measures[key]));
    let _ = write!(
        html,
        "<h2>Ten lowest by {}</h2><table class=\"examples\"><tr><th></th><th>ticket</th>\
         <th>ROUGE-L</th><th>drift</th><th>compr.</th><th>alerts</th><th>text</th>\
         <th>summary</th><th>reference</th></tr>",
        if key == ROUGE_L { "ROUGE-L" } else { "drift" }
    );
    for r in worst.iter().take(10) {
        let _ = write!(
            html,
            "<tr><td><span class=\"key\" style=\"background:{}\"></span></td><td>{}<br>\
             <small>{}</small></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"text\">{}</td><td class=\"text\">{}</td><td class=\"text\">{}</td></tr>",
            COLOURS[r.run % COLOURS.len()],
            escape(&r.id),
            escape(&r.topic),
            number(r.measures.get(ROUGE_L).copied()),
            number(r.measures.get(DRIFT).copied()),
            number(r.measures.get(COMPRESSION).copied()),
            escape(&r.alerts.join(", ")),
            escape(&shorten(&r.text, 400)),
            escape(&r.summary),
            escape(&r.reference),
        );
    }
    html.push_str("</table>");
    let describe = |t: &AlertThresholds| {
        format!(
            "drift &lt; {}, compression outside [{}, {}], stability &gt; {}",
            t.drift_min, t.compression_min, t.compression_max, t.stability_max
        )
    };
    if evaluation.runs.iter().all(|r| &r.thresholds == thresholds) {
        let _ = write!(
            html,
            "<p class=\"where\">Alerts: {}.</p>",
            describe(thresholds)
        );
    } else {
        html.push_str("<p class=\"where\">Alerts, each run by its own thresholds:");
        for run in &evaluation.runs {
            let _ = write!(
                html,
                "<br>{}: {}",
                escape(&run.run_id),
                describe(&run.thresholds)
            );
        }
        html.push_str("</p>");
    }
    html.push_str("</body></html>\n");
    html
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;\
color:#222}h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em}table{border-collapse:collapse}\
td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right;vertical-align:top}\
th{background:#f4f4f4}td.text{text-align:left;max-width:260px;font-size:12px}\
.key{display:inline-block;width:12px;height:12px;border-radius:2px}.where{color:#666}\
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}figure{margin:0}\
figcaption{font-weight:600;margin-bottom:4px}svg text{font:11px system-ui,sans-serif;fill:#444}";

/// Plot area of every chart: width, height, and the margins for axes.
const W: f64 = 520.0;
const H: f64 = 220.0;
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 24.0;

/// Overlaid histograms (one outline per run) of values in [0, 1] (wider data widens the
/// axis), with vertical lines at `lines`.
fn histogram(runs: &[Vec<f64>], lines: &[f64]) -> String {
    let bins = 20;
    let hi = runs
        .iter()
        .flatten()
        .copied()
        .chain(lines.iter().copied())
        .fold(1.0f64, f64::max);
    let lo = runs.iter().flatten().copied().fold(0.0f64, f64::min);
    let span = (hi - lo).max(1e-9);
    let counts: Vec<Vec<usize>> = runs
        .iter()
        .map(|values| {
            let mut c = vec![0usize; bins];
            for v in values {
                let b = (((v - lo) / span) * bins as f64).floor() as usize;
                c[b.min(bins - 1)] += 1;
            }
            c
        })
        .collect();
    let top = counts.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    let x = |v: f64| LEFT + (v - lo) / span * (W - LEFT - 10.0);
    let y = |n: f64| H - BOTTOM - n / top * (H - BOTTOM - 10.0);
    let mut svg = svg_open();
    axes(&mut svg, lo, hi, top);
    for line in lines {
        let _ = write!(
            svg,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"8\" y2=\"{1:.1}\" stroke=\"#c00\" \
             stroke-dasharray=\"4 3\"/><text x=\"{2:.1}\" y=\"18\" style=\"fill:#c00\">{3}</text>",
            x(*line),
            H - BOTTOM,
            x(*line) + 3.0,
            line
        );
    }
    for (run, c) in counts.iter().enumerate() {
        let mut path = format!("M{:.1},{:.1}", x(lo), y(0.0));
        for (b, n) in c.iter().enumerate() {
            let (x0, x1) = (
                x(lo + span * b as f64 / bins as f64),
                x(lo + span * (b + 1) as f64 / bins as f64),
            );
            let _ = write!(
                path,
                " L{x0:.1},{:.1} L{x1:.1},{:.1}",
                y(*n as f64),
                y(*n as f64)
            );
        }
        let _ = write!(path, " L{:.1},{:.1}", x(hi), y(0.0));
        let colour = COLOURS[run % COLOURS.len()];
        let _ = write!(
            svg,
            "<path d=\"{path}\" fill=\"{colour}\" fill-opacity=\"0.18\" stroke=\"{colour}\" \
             stroke-width=\"1.5\"/>"
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Mean ROUGE-L per topic, one bar per run.
fn topic_bars(topics: &BTreeMap<&str, Vec<(f64, usize)>>) -> String {
    let runs = topics.values().next().map_or(1, Vec::len).max(1);
    let height = 26.0 * topics.len() as f64 * runs.max(1) as f64 / 2.0 + 40.0;
    let label = 120.0;
    let bar = 12.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {W} {height:.0}\">"
    );
    let mut top = 10.0;
    for (topic, per_run) in topics {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            label - 6.0,
            top + bar * runs as f64 / 2.0 + 4.0,
            escape(topic)
        );
        for (run, (sum, n)) in per_run.iter().enumerate() {
            if *n > 0 {
                let mean = sum / *n as f64;
                let width = mean * (W - label - 60.0);
                let _ = write!(
                    svg,
                    "<rect x=\"{label}\" y=\"{top:.1}\" width=\"{width:.1}\" height=\"{:.1}\" \
                     fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{mean:.3} ({n})</text>",
                    bar - 2.0,
                    COLOURS[run % COLOURS.len()],
                    label + width + 4.0,
                    top + bar - 3.0
                );
            }
            top += bar;
        }
        top += 8.0;
    }
    svg.push_str("</svg>");
    svg
}

/// Points (compression, drift) coloured by run, with the alert regions shaded.
fn scatter(points: &[(f64, f64, usize)], t: &AlertThresholds) -> String {
    let x_hi = points
        .iter()
        .map(|p| p.0)
        .fold(t.compression_max * 1.5, f64::max)
        .min(5.0);
    let (y_lo, y_hi) = (points.iter().map(|p| p.1).fold(0.0f64, f64::min), 1.0f64);
    let x = |v: f64| LEFT + v.min(x_hi) / x_hi * (W - LEFT - 10.0);
    let y = |v: f64| H - BOTTOM - (v - y_lo) / (y_hi - y_lo).max(1e-9) * (H - BOTTOM - 10.0);
    let mut svg = svg_open();
    let shade = |svg: &mut String, x0: f64, x1: f64, y0: f64, y1: f64| {
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#c00\" \
             fill-opacity=\"0.07\"/>",
            x0.min(x1),
            y0.min(y1),
            (x1 - x0).abs(),
            (y1 - y0).abs()
        );
    };
    shade(&mut svg, x(0.0), x(t.compression_min), y(y_lo), y(y_hi));
    shade(&mut svg, x(t.compression_max), x(x_hi), y(y_lo), y(y_hi));
    shade(&mut svg, x(0.0), x(x_hi), y(y_lo), y(t.drift_min));
    axes_xy(&mut svg, x_hi, y_lo, y_hi);
    for (cx, cy, run) in points {
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\" fill-opacity=\"0.7\"/>",
            x(*cx),
            y(*cy),
            COLOURS[run % COLOURS.len()]
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">compression →</text>\
         <text x=\"{:.1}\" y=\"14\">↑ drift</text></svg>",
        W - 10.0,
        H - BOTTOM - 4.0,
        LEFT + 4.0
    );
    svg
}

fn svg_open() -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">"
    )
}

/// Axes for a histogram: values along x, counts up y.
fn axes(svg: &mut String, lo: f64, hi: f64, top: f64) {
    let (right, base, under, left) = (W - 10.0, H - BOTTOM, H - 8.0, LEFT - 4.0);
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" x2=\"{right}\" y1=\"{base}\" y2=\"{base}\" stroke=\"#888\"/>\
         <text x=\"{LEFT}\" y=\"{under}\">{lo}</text>\
         <text x=\"{right}\" y=\"{under}\" text-anchor=\"end\">{hi}</text>\
         <text x=\"{left}\" y=\"14\" text-anchor=\"end\">{top}</text>"
    );
}

/// Axes for the scatter plot.
fn axes_xy(svg: &mut String, x_hi: f64, y_lo: f64, y_hi: f64) {
    let (right, base, under, left) = (W - 10.0, H - BOTTOM, H - 8.0, LEFT - 4.0);
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" x2=\"{right}\" y1=\"{base}\" y2=\"{base}\" stroke=\"#888\"/>\
         <line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"8\" y2=\"{base}\" stroke=\"#888\"/>\
         <text x=\"{LEFT}\" y=\"{under}\">0</text>\
         <text x=\"{right}\" y=\"{under}\" text-anchor=\"end\">{x_hi:.2}</text>\
         <text x=\"{left}\" y=\"{base}\" text-anchor=\"end\">{y_lo:.2}</text>\
         <text x=\"{left}\" y=\"14\" text-anchor=\"end\">{y_hi:.2}</text>"
    );
}
