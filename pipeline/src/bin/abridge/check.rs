//! `abridge check-kernels`: the paged KV cache and PagedAttention's kernels on a device
//! against plain attention on the host (`abridge_models::engine::check`).

use abridge_models::engine::check::check_paged_attention;
use abridge_models::models::bloom::alibi_slopes;
use anyhow::{Context, bail};

use crate::args::CheckKernelsArgs;

pub fn check_kernels(args: &CheckKernelsArgs) -> anyhow::Result<()> {
    let device = abridge_models::device(&args.device)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--device {}", args.device))?;
    let cases = check_paged_attention(&device, alibi_slopes)
        .with_context(|| format!("PagedAttention on {}", args.device))?;
    println!(
        "PagedAttention on {} against plain attention on the host (f32, head size 64, ALiBi):",
        args.device
    );
    let mut worst = 0f32;
    for case in &cases {
        println!(
            "  {:>2} heads, lengths {:?}: largest difference {:.2e}",
            case.heads, case.lens, case.max_difference
        );
        worst = worst.max(case.max_difference);
    }
    if worst.is_nan() || worst > args.tolerance {
        bail!(
            "PagedAttention differs by {worst:.2e}, more than {:.0e}",
            args.tolerance
        );
    }
    println!("  equal within {:.0e}", args.tolerance);
    Ok(())
}
