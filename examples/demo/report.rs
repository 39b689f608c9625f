//! The report: everything counted, the checks, the verdict.

use std::path::PathBuf;
use std::time::Duration;

use crate::{Backend, Options, PG_ENV, ServerKind};

/// Everything counted, and the verdict's inputs.
pub(crate) struct Report {
    pub(crate) options: Options,
    pub(crate) elapsed: Duration,
    pub(crate) rows: Vec<(String, u64)>,
    /// What failed; empty when every check held.
    pub(crate) failures: Vec<String>,
    pub(crate) checks: Vec<String>,
    pub(crate) kept: Option<PathBuf>,
    /// The PostgreSQL schema kept (`--keep`, or a failed verdict).
    pub(crate) kept_schema: Option<String>,
}

impl Report {
    /// Whether every check held.
    pub(crate) fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The summary table and the verdict, as printed at the end.
    pub(crate) fn table(&self) -> String {
        let mut out = format!(
            "\nidemstore demo: {} payments from {} clients, seed {}, {:.1} s\n\n",
            self.options.payments,
            self.options.clients,
            self.options.seed,
            self.elapsed.as_secs_f64()
        );
        let o = &self.options;
        if (o.backend, o.replicas, o.server) != (Backend::Redb, 1, ServerKind::Hyper) {
            out.push_str(&format!(
                "store on {}, {} service process(es) on {}\n\n",
                o.backend.name(),
                o.replicas,
                o.server.name()
            ));
        }
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        for (label, value) in &self.rows {
            out.push_str(&format!("  {label:<width$}  {value:>7}\n"));
        }
        out.push('\n');
        for check in &self.checks {
            out.push_str(&format!("  ok    {check}\n"));
        }
        for failure in &self.failures {
            out.push_str(&format!("  FAIL  {failure}\n"));
        }
        if let Some(schema) = &self.kept_schema {
            out.push_str(&format!(
                "\nschema {schema} kept in the database ({PG_ENV}); look at the charges:\n  \
                 psql \"${PG_ENV}\" -c 'SELECT * FROM {schema}.ledger ORDER BY payment'\n  \
                 drop it with: psql \"${PG_ENV}\" -c 'DROP SCHEMA {schema} CASCADE'\n"
            ));
        }
        if let (Some(dir), Backend::Postgres) = (&self.kept, self.options.backend) {
            out.push_str(&format!(
                "\nfiles kept in {} (the clients' outboxes, the servers' log)\n",
                dir.display()
            ));
        } else if let Some(dir) = &self.kept {
            out.push_str(&format!(
                "\nfiles kept in {}\n  look inside the store: cargo run --features cli --bin idemstore -- stats {}\n",
                dir.display(),
                dir.join("payments.redb").display()
            ));
        }
        out.push_str(if self.ok() {
            "\nVERDICT: OK: charges executed == logical payments; every payment charged exactly once\n"
        } else {
            "\nVERDICT: VIOLATED: see FAIL above\n"
        });
        out
    }
}
