//! The `chaos` command line: validate scenarios, run a relay by hand, render reports.
fn main() {}
