//! The example programs, run as child processes by the tests that check them: cargo builds
//! every example before it runs the integration tests, into `target/<profile>/examples/`,
//! beside the `deps/` folder that holds the test binaries.

use std::path::PathBuf;

/// The path of the built example program `name`.
///
/// # Panics
///
/// When it is not built, with the command that builds it.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of this executable");
    let dir = exe.parent().expect("the executable's folder");
    // A test binary is in `deps/`; an example (one example running another) in `examples/`.
    let examples = if dir.ends_with("examples") {
        dir.to_path_buf()
    } else {
        dir.parent().expect("the profile folder").join("examples")
    };
    let path = examples.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "the example `{name}` is not built at {}: `cargo test` builds it when run without a \
         target filter; else run `cargo build --example {name}` first",
        path.display()
    );
    path
}
