//! `abridge check-kernels`: the paged KV cache and PagedAttention's kernels on a device
//! against plain attention on the host (`abridge_models::engine::check`).

use abridge_models::engine::check::{check_paged_attention, tolerance};
use abridge_models::models::bloom::alibi_slopes;
use anyhow::{Context, bail};
use candle_core::DType;

use crate::args::CheckKernelsArgs;

pub fn check_kernels(args: &CheckKernelsArgs) -> anyhow::Result<()> {
    let device = abridge_models::device(&args.device)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--device {}", args.device))?;
    println!(
        "PagedAttention on {} against plain attention on the host (head size 64, ALiBi):",
        args.device
    );
    let mut failed = Vec::new();
    for name in &args.dtypes {
        let dtype = match name.as_str() {
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            _ => DType::F32,
        };
        let cases = check_paged_attention(&device, dtype, alibi_slopes)
            .with_context(|| format!("PagedAttention in {name} on {}", args.device))?;
        let allowed = args.tolerance.unwrap_or(tolerance(dtype));
        let mut worst = 0f32;
        for case in &cases {
            println!(
                "  {name:>8}, {:>2} heads, lengths {:?}: largest difference {:.2e}",
                case.heads, case.lens, case.max_difference
            );
            worst = if worst.is_nan() || case.max_difference.is_nan() {
                f32::NAN
            } else {
                worst.max(case.max_difference)
            };
        }
        if worst.is_nan() || worst > allowed {
            println!("  {name:>8}: differs by {worst:.2e}, more than {allowed:.0e}");
            failed.push(name.as_str());
        } else {
            println!("  {name:>8}: equal within {allowed:.0e}");
        }
    }
    if !failed.is_empty() {
        bail!(
            "PagedAttention differs from plain attention in {}",
            failed.join(", ")
        );
    }
    Ok(())
}
