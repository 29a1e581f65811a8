//! Command-line programs that show the sd-* crates at work; run them with
//! `cargo run --release --example NAME`. This library target is empty: it exists so that the
//! package has a home for the examples.
