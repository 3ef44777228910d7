//! `abridge cache`: the SQL model answers kept in `$ABRIDGE_CACHE/sql-results`.

use abridge_pipeline::sql::result_cache;

use crate::args::CacheArgs;

pub fn cache(args: &CacheArgs) -> anyhow::Result<()> {
    let dir = abridge_models::cache_dir().join("sql-results");
    if args.clear {
        let freed = result_cache::clear(&dir)?;
        println!("cleared {}: {} freed", dir.display(), size(freed));
        return Ok(());
    }
    let summary = result_cache::summary(&dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!("{}", dir.display());
    println!(
        "  {} answers in {} files, {}",
        summary.answers,
        summary.files,
        size(summary.bytes)
    );
    let asked = summary.model_calls + summary.cache_hits;
    let share = match asked {
        0 => String::new(),
        _ => format!(
            " ({:.0}% of inputs)",
            100.0 * summary.cache_hits as f64 / asked as f64
        ),
    };
    println!(
        "  {} queries: {} model calls, {} answered from the cache{share}",
        summary.queries, summary.model_calls, summary.cache_hits
    );
    Ok(())
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}
