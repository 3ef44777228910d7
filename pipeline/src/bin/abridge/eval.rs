//! `abridge eval`: an evaluation of historical runs, its report, and its table on stdout.

use std::collections::BTreeMap;

use abridge_pipeline::eval::{self, AlertOverrides, EvalOptions};
use abridge_pipeline::report;
use anyhow::Context;

use crate::args::EvalArgs;

pub async fn eval(args: EvalArgs) -> anyhow::Result<()> {
    // Compared runs are evaluated (alone, unless --run names more).
    let mut run_ids = args.run_ids.clone();
    for id in &args.compare {
        if !run_ids.contains(id) {
            run_ids.push(id.clone());
        }
    }
    let options = EvalOptions {
        runs: args.runs.clone(),
        run_ids,
        summary: args.summary.clone(),
        reference: args.reference.clone(),
        reference_table: args.reference_table.clone(),
        stem: args.stem,
        recompute: args.recompute.clone(),
        encoder: args.encoder.clone(),
        thresholds: AlertOverrides {
            drift_min: args.drift_min,
            compression_min: args.compression_min,
            compression_max: args.compression_max,
            stability_max: args.stability_max,
        },
        out: args.out.clone(),
    };
    let evaluation = eval::evaluate(&options).await?;
    let comparison = match args.compare.as_slice() {
        [a, b] => Some(eval::compare(&evaluation, a, b).await?),
        _ => None,
    };
    if let Some(comparison) = &comparison {
        let text = serde_json::to_string_pretty(comparison)?;
        let path = evaluation.dir.join("comparison.json");
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    report::write_report(
        &evaluation.dir.join("report.html"),
        &evaluation,
        comparison.as_ref(),
    )?;
    if args.json {
        let out = serde_json::json!({
            "dir": evaluation.dir,
            "runs": evaluation.runs,
            "comparison": comparison,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mean = |m: &BTreeMap<String, Option<f64>>, k: &str| match m.get(k).copied().flatten() {
        Some(v) => format!("{v:.3}"),
        None => "-".into(),
    };
    println!("evaluation → {}", evaluation.dir.display());
    println!(
        "  {:<32} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "run", "rows", "no ref", "rouge1", "rouge2", "rouge_l", "drift", "compr.", "alerted"
    );
    for run in &evaluation.runs {
        println!(
            "  {:<32} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
            run.run_id,
            run.summarized,
            run.without_reference,
            mean(&run.means, "rouge1"),
            mean(&run.means, "rouge2"),
            mean(&run.means, "rouge_l"),
            mean(&run.means, "drift"),
            mean(&run.means, "compression"),
            run.alerts.values().sum::<u64>(),
        );
    }
    if let Some(c) = &comparison {
        println!(
            "\n{} vs {} on {} shared tickets",
            c.run_a, c.run_b, c.shared
        );
        println!(
            "  {:<12} {:>8} {:>8} {:>7} {:>7} {:>7}",
            "measure", "mean A", "mean B", "A wins", "B wins", "ties"
        );
        let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
        let count = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
        for m in &c.measures {
            println!(
                "  {:<12} {:>8} {:>8} {:>7} {:>7} {:>7}",
                m.measure,
                num(m.mean_a),
                num(m.mean_b),
                count(m.a_wins),
                count(m.b_wins),
                count(m.ties)
            );
        }
        for (alert, (a, b)) in &c.alerts {
            println!("  alert {alert:<20} A {a:>5}  B {b:>5}");
        }
    }
    Ok(())
}
