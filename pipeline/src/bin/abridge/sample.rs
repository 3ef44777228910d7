//! `abridge sample`: a synthetic ticket table.

use abridge_pipeline::sample::{SampleOptions, write_sample};

use crate::args::SampleArgs;

pub fn sample(args: &SampleArgs) -> anyhow::Result<()> {
    let options = SampleOptions {
        rows: args.rows,
        seed: args.seed,
        clean: args.clean,
    };
    write_sample(&options, &args.out)?;
    eprintln!(
        "wrote {} tickets (seed {}) to {}",
        args.rows,
        args.seed,
        args.out.display()
    );
    Ok(())
}
