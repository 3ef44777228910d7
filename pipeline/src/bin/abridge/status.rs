//! `abridge status`: the live and recent runs of an output table.

use abridge_pipeline::PipelineError;
use abridge_pipeline::job::Job;
use anyhow::Context;

use crate::args::{StatusArgs, job_or_default};

pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let output = match (&args.output, &args.job) {
        (Some(output), _) => output.clone(),
        (None, job) => {
            let path = job_or_default(job.as_ref(), "a job or --output DIR")?;
            Job::load(&path, &[])
                .map_err(PipelineError::from)?
                .config
                .output
                .path
        }
    };
    let runs = abridge_pipeline::status::recent_runs(&output, args.last)
        .with_context(|| format!("cannot read the runs of {}", output.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else if runs.is_empty() {
        println!("no runs in {}", output.display());
    } else {
        print!("{}", abridge_pipeline::status::table(&runs));
    }
    Ok(())
}
