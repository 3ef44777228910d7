//! Rewrites of a query's logical plan around the model functions: DataFusion evaluates
//! async functions (the model functions) only in projections, filters and aggregate
//! arguments, never nested in one another, and a sort or limit above a projection that
//! calls a model would send every row to it.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::BooleanArray;
use arrow::datatypes::DataType;
use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    Aggregate, ColumnarValue, Expr, Filter, LogicalPlan, Projection, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Sort, SortExpr, SubqueryAlias, Volatility,
};

use super::model_functions;
use crate::error::PipelineError;

/// DataFusion runs async functions (the model functions) in projections, filters and
/// aggregate arguments, and abridge moves those that group or sort into a projection
/// ([`group_and_sort_by_model_calls`]); elsewhere (grouping sets, ROLLUP, CUBE) it fails
/// with an internal error, which is the user's to work around.
pub(super) fn placement_error(e: datafusion::error::DataFusionError) -> PipelineError {
    match e
        .to_string()
        .contains("async functions should not be called directly")
    {
        true => PipelineError::Query(
            "a model function (summarize, embed, classify, extract_fields) cannot be computed \
             where this query calls it (GROUPING SETS, ROLLUP, CUBE, a join condition): make \
             it a column of a subquery and use that column, e.g. SELECT c, count(*) FROM \
             (SELECT classify(text, ['a', 'b']) AS c FROM t) GROUP BY ROLLUP (c)"
                .into(),
        ),
        false => e.into(),
    }
}

/// Whether `plan` calls one of the model functions anywhere (subqueries included).
pub(super) fn calls_models(plan: &LogicalPlan) -> Result<bool, PipelineError> {
    let mut found = false;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            found |= calls_model(expr);
            Ok(match found {
                true => TreeNodeRecursion::Stop,
                false => TreeNodeRecursion::Continue,
            })
        })
    })?;
    Ok(found)
}

/// Whether `expr` calls one of the model functions.
fn calls_model(expr: &Expr) -> bool {
    expr.exists(|e| {
        Ok(matches!(e, Expr::ScalarFunction(f) if model_functions::NAMES.contains(&f.name())))
    })
    .unwrap_or(true)
}

/// Sorts before the model calls that a sort does not depend on. SQL plans `SELECT id,
/// summarize(text) FROM t ORDER BY id LIMIT 4` as a sort over the projection that calls
/// the model, so every row would be summarized before four are kept; sorting the
/// projection's input by the same keys and projecting after gives the same rows in the
/// same order, and the optimizer then pushes the `LIMIT` into the sort, so that four rows
/// reach the model. A key that is a computed column (`rouge_l(..) AS r ... ORDER BY r`)
/// is computed once, below the sort, and shown from there; a volatile one (`random()`)
/// keeps the plan as written, as does a key that is a model's answer.
pub(super) fn sort_before_model_calls(plan: LogicalPlan) -> Result<LogicalPlan, PipelineError> {
    let rewritten = plan.transform_up(|node| {
        let LogicalPlan::Sort(sort) = &node else {
            return Ok(Transformed::no(node));
        };
        let LogicalPlan::Projection(projection) = sort.input.as_ref() else {
            return Ok(Transformed::no(node));
        };
        if !projection.expr.iter().any(calls_model) {
            return Ok(Transformed::no(node));
        }
        // The sort keys in terms of the projection's input: a projected column stands for
        // its source column, a computed one for a column computed below the sort.
        let outputs: HashMap<Column, usize> = projection
            .schema
            .columns()
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, i))
            .collect();
        let sort_column = |i: usize| format!("__abridge_sort_{i}");
        let mut computed: Vec<usize> = Vec::new();
        let mut keys: Vec<SortExpr> = Vec::with_capacity(sort.expr.len());
        for key in &sort.expr {
            let expr = key.expr.clone().transform(|e| {
                let Expr::Column(c) = &e else {
                    return Ok(Transformed::no(e));
                };
                let Some(&i) = outputs.get(c) else {
                    return Ok(Transformed::no(e));
                };
                match projection.expr[i].clone().unalias() {
                    source @ Expr::Column(_) => Ok(Transformed::yes(source)),
                    _ => {
                        if !computed.contains(&i) {
                            computed.push(i);
                        }
                        Ok(Transformed::yes(Expr::Column(Column::new_unqualified(
                            sort_column(i),
                        ))))
                    }
                }
            })?;
            keys.push(key.with_expr(expr.data));
        }
        let unmovable = |e: &Expr| calls_model(e) || e.is_volatile();
        if keys.iter().any(|k| unmovable(&k.expr))
            || computed.iter().any(|&i| unmovable(&projection.expr[i]))
        {
            return Ok(Transformed::no(node));
        }
        let mut below: Vec<Expr> = projection
            .input
            .schema()
            .columns()
            .into_iter()
            .map(Expr::Column)
            .collect();
        below.extend(
            computed
                .iter()
                .map(|&i| projection.expr[i].clone().unalias().alias(sort_column(i))),
        );
        let below = match computed.is_empty() {
            true => Arc::clone(&projection.input),
            false => Arc::new(LogicalPlan::Projection(Projection::try_new(
                below,
                Arc::clone(&projection.input),
            )?)),
        };
        let sorted = LogicalPlan::Sort(Sort {
            expr: keys,
            input: below,
            fetch: sort.fetch,
        });
        let shown = projection
            .expr
            .iter()
            .enumerate()
            .map(|(i, e)| match computed.contains(&i) {
                true => {
                    let (qualifier, field) = projection.schema.qualified_field(i);
                    Expr::Column(Column::new_unqualified(sort_column(i)))
                        .alias_qualified(qualifier.cloned(), field.name())
                }
                false => e.clone(),
            })
            .collect();
        let projected = Projection::try_new(shown, Arc::new(sorted))?;
        Ok(Transformed::yes(LogicalPlan::Projection(projected)))
    })?;
    Ok(rewritten.data)
}

/// Computes the model calls among the arguments of other model calls
/// (`embed(summarize(text))`) first, in projections below, innermost first: DataFusion
/// computes an async function's arguments before calling it, but not another async
/// function among them. Each such projection sits under a subquery alias of its own (with
/// its columns renamed, so that no two share a name), which keeps the optimizer from
/// merging it back into the call above. Projections keep their column names; a filter is
/// followed by a projection of its input's columns under their own names.
pub(super) fn lift_nested_model_calls(plan: LogicalPlan) -> Result<LogicalPlan, PipelineError> {
    let mut lifted = 0usize;
    let rewritten = plan.transform_up(|node| {
        let (exprs, input) = match &node {
            LogicalPlan::Projection(p) => (p.expr.clone(), Arc::clone(&p.input)),
            LogicalPlan::Filter(f) => (vec![f.predicate.clone()], Arc::clone(&f.input)),
            _ => return Ok(Transformed::no(node)),
        };
        let (mut now, mut below, mut alias) = (exprs.clone(), Arc::clone(&input), None);
        loop {
            let inner = nested_calls(&now);
            if inner.is_empty() {
                break;
            }
            let name = format!("__abridge_lifted_{lifted}");
            lifted += 1;
            let columns = below.schema().columns();
            let renamed = |i: usize| format!("__abridge_c{i}");
            let computed = |k: usize| format!("__abridge_nested_{k}");
            let mut projected: Vec<Expr> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| Expr::Column(c.clone()).alias(renamed(i)))
                .collect();
            projected.extend(
                inner
                    .iter()
                    .enumerate()
                    .map(|(k, call)| call.clone().alias(computed(k))),
            );
            let projection = Projection::try_new(projected, below)?;
            below = Arc::new(LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(
                Arc::new(LogicalPlan::Projection(projection)),
                name.as_str(),
            )?));
            let column = |field: String| Expr::Column(Column::new(Some(name.as_str()), field));
            now = now
                .into_iter()
                .map(|e| {
                    e.transform_down(|x| {
                        if let Some(k) = inner.iter().position(|c| *c == x) {
                            return Ok(Transformed::yes(column(computed(k))));
                        }
                        match &x {
                            Expr::Column(c) => match columns.iter().position(|d| d == c) {
                                Some(i) => Ok(Transformed::yes(column(renamed(i)))),
                                None => Ok(Transformed::no(x)),
                            },
                            _ => Ok(Transformed::no(x)),
                        }
                    })
                    .map(|t| t.data)
                })
                .collect::<datafusion::error::Result<_>>()?;
            alias = Some(name);
        }
        let Some(alias) = alias else {
            return Ok(Transformed::no(node));
        };
        let rebuilt = match &node {
            LogicalPlan::Projection(p) => {
                let named = now
                    .into_iter()
                    .zip(&exprs)
                    .enumerate()
                    .map(|(i, (new, old))| match old {
                        Expr::Alias(_) => new,
                        _ => {
                            let (qualifier, field) = p.schema.qualified_field(i);
                            new.alias_qualified(qualifier.cloned(), field.name())
                        }
                    })
                    .collect();
                LogicalPlan::Projection(Projection::try_new(named, below)?)
            }
            _ => {
                let predicate = now.into_iter().next().unwrap_or(Expr::Literal(
                    datafusion::common::ScalarValue::Boolean(Some(true)),
                    None,
                ));
                let filtered = LogicalPlan::Filter(Filter::try_new(predicate, below)?);
                // The input's columns: the first ones of every lifted projection.
                let columns = input
                    .schema()
                    .iter()
                    .enumerate()
                    .map(|(i, (qualifier, field))| {
                        Expr::Column(Column::new(Some(alias.as_str()), format!("__abridge_c{i}")))
                            .alias_qualified(qualifier.cloned(), field.name())
                    });
                LogicalPlan::Projection(Projection::try_new(columns.collect(), Arc::new(filtered))?)
            }
        };
        Ok(Transformed::yes(rebuilt))
    })?;
    Ok(rewritten.data)
}

/// The arguments of `expr` when it is a model call.
fn model_call_args(expr: &Expr) -> Option<&[Expr]> {
    match expr {
        Expr::ScalarFunction(f) if model_functions::NAMES.contains(&f.name()) => Some(&f.args),
        _ => None,
    }
}

/// The distinct model calls, within `exprs`, that are inside another model call's arguments
/// and have none in their own.
fn nested_calls(exprs: &[Expr]) -> Vec<Expr> {
    let mut found: Vec<Expr> = Vec::new();
    for expr in exprs {
        let _ = expr.apply(|e| {
            for arg in model_call_args(e).unwrap_or_default() {
                let _ = arg.apply(|a| {
                    let leaf = model_call_args(a).is_some_and(|args| !args.iter().any(calls_model));
                    if leaf && !found.contains(a) {
                        found.push(a.clone());
                    }
                    Ok(TreeNodeRecursion::Continue)
                });
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }
    found
}

/// The plan the counting pass of `--max-model-rows` runs, and whether it is the query's
/// own. There the model functions answer what they have cached and a stand-in, distinct
/// per input, for the rest, so that a call over another call's answer is counted too.
/// What the stand-ins cannot decide is bounded from above: a filter over model answers
/// lets every row through (its calls still made and counted), and a limit above such a
/// filter is lifted. A join on a model's answer below other model calls has no such
/// bound: refused, naming the way around.
pub(super) fn counting_plan(plan: LogicalPlan) -> Result<(LogicalPlan, bool), PipelineError> {
    refuse_joins_on_answers(&plan, false)?;
    let every_row = Arc::new(ScalarUDF::new_from_impl(EveryRow::default()));
    let has_model_filter = |plan: &LogicalPlan| {
        plan.exists(|n| Ok(matches!(n, LogicalPlan::Filter(f) if calls_model(&f.predicate))))
            .unwrap_or(true)
    };
    let rewritten = plan.transform_up(|node| match node {
        LogicalPlan::Filter(f) if calls_model(&f.predicate) => {
            let predicate = Expr::ScalarFunction(ScalarFunction::new_udf(
                Arc::clone(&every_row),
                vec![f.predicate],
            ));
            let filter = Filter::try_new(predicate, f.input)?;
            Ok(Transformed::yes(LogicalPlan::Filter(filter)))
        }
        LogicalPlan::Limit(limit) if has_model_filter(&limit.input) => {
            Ok(Transformed::yes(Arc::unwrap_or_clone(limit.input)))
        }
        LogicalPlan::Sort(sort) if sort.fetch.is_some() && has_model_filter(&sort.input) => {
            Ok(Transformed::yes(LogicalPlan::Sort(Sort {
                fetch: None,
                ..sort
            })))
        }
        node => Ok(Transformed::no(node)),
    })?;
    Ok((rewritten.data, !rewritten.transformed))
}

/// Refuses a join whose keys are model answers (columns computed by a model call below it)
/// when model calls sit above it: the counting pass's stand-ins would match nothing there.
fn refuse_joins_on_answers(node: &LogicalPlan, above: bool) -> Result<(), PipelineError> {
    let above_inputs = above || node.expressions().iter().any(calls_model);
    if let LogicalPlan::Join(join) = node
        && above
    {
        let mut answers: Vec<String> = Vec::new();
        let _ = node.apply(|n| {
            if let LogicalPlan::Projection(p) = n {
                for (expr, field) in p.expr.iter().zip(p.schema.fields()) {
                    if calls_model(expr) {
                        answers.push(field.name().clone());
                    }
                }
            }
            Ok(TreeNodeRecursion::Continue)
        });
        let keys = join.on.iter().flat_map(|(l, r)| [l, r]).chain(&join.filter);
        let on_answers = keys
            .flat_map(|k| k.column_refs())
            .any(|c| answers.contains(&c.name));
        if on_answers {
            return Err(PipelineError::Query(
                "--max-model-rows cannot count the model calls above a join on a model's \
                 answer (which rows meet is known only once the model has answered): write \
                 the inner query's rows with --out and join that file (--table NAME=FILE), \
                 or lift the guard with --max-model-rows 0"
                    .into(),
            ));
        }
    }
    for input in node.inputs() {
        refuse_joins_on_answers(input, above_inputs)?;
    }
    Ok(())
}

/// `abridge_every_row(predicate)`: true for every row, once its argument (and the model
/// calls in it) has been computed; the counting pass's stand-in for a filter over model
/// answers.
#[derive(Debug, PartialEq, Eq, Hash)]
struct EveryRow {
    signature: Signature,
}

impl Default for EveryRow {
    fn default() -> Self {
        Self {
            signature: Signature::any(1, Volatility::Volatile),
        }
    }
}

impl ScalarUDFImpl for EveryRow {
    fn name(&self) -> &str {
        "abridge_every_row"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(vec![
            true;
            args.number_rows
        ]))))
    }
}

/// Computes the model calls that a `GROUP BY` groups by, or an `ORDER BY` sorts by, in a
/// projection under the aggregate or sort, which then uses their columns: DataFusion
/// evaluates async functions (the model functions) in projections, not in grouping or
/// sort expressions. Groups keep their names, and a sort is followed by a projection of
/// its input's columns, so the plan above is unchanged.
pub(super) fn group_and_sort_by_model_calls(
    plan: LogicalPlan,
) -> Result<LogicalPlan, PipelineError> {
    let rewritten = plan.transform_up(|node| match &node {
        LogicalPlan::Aggregate(aggregate) => {
            let grouping_sets = aggregate
                .group_expr
                .iter()
                .any(|e| matches!(e, Expr::GroupingSet(_)));
            if grouping_sets || !aggregate.group_expr.iter().any(calls_model) {
                return Ok(Transformed::no(node));
            }
            let (below, groups) = computed_below(&aggregate.input, &aggregate.group_expr)?;
            let groups = groups
                .into_iter()
                .zip(&aggregate.group_expr)
                .map(|(new, old)| match new == *old {
                    true => new,
                    false => new.alias(old.schema_name().to_string()),
                })
                .collect();
            let grouped = Aggregate::try_new(below, groups, aggregate.aggr_expr.clone())?;
            Ok(Transformed::yes(LogicalPlan::Aggregate(grouped)))
        }
        LogicalPlan::Sort(sort) if sort.expr.iter().any(|k| calls_model(&k.expr)) => {
            let keys: Vec<Expr> = sort.expr.iter().map(|k| k.expr.clone()).collect();
            let (below, keys) = computed_below(&sort.input, &keys)?;
            let keys = sort
                .expr
                .iter()
                .zip(keys)
                .map(|(old, new)| old.with_expr(new))
                .collect();
            let sorted = LogicalPlan::Sort(Sort {
                expr: keys,
                input: below,
                fetch: sort.fetch,
            });
            let columns = sort.input.schema().columns().into_iter().map(Expr::Column);
            let projected = Projection::try_new(columns.collect(), Arc::new(sorted))?;
            Ok(Transformed::yes(LogicalPlan::Projection(projected)))
        }
        _ => Ok(Transformed::no(node)),
    })?;
    Ok(rewritten.data)
}

/// `input` with a column for each of `exprs` that calls a model, and `exprs` with those
/// calls replaced by their columns.
fn computed_below(
    input: &Arc<LogicalPlan>,
    exprs: &[Expr],
) -> datafusion::error::Result<(Arc<LogicalPlan>, Vec<Expr>)> {
    let mut below: Vec<Expr> = input
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    let mut replaced = Vec::with_capacity(exprs.len());
    for (i, expr) in exprs.iter().enumerate() {
        if !calls_model(expr) {
            replaced.push(expr.clone());
            continue;
        }
        let column = format!("__abridge_model_{i}");
        below.push(expr.clone().alias(&column));
        replaced.push(Expr::Column(Column::new_unqualified(column)));
    }
    let below = Projection::try_new(below, Arc::clone(input))?;
    Ok((Arc::new(LogicalPlan::Projection(below)), replaced))
}
