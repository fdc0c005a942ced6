//! Compiles the protobuf contracts with protox (pure Rust), so no system `protoc` is needed.
//!
//! - `proto/ferry/v1/handler.proto`: the native contract (client for ferry, server for tests);
//! - `tests/proto/inventory/v1/inventory.proto`: a service that knows nothing of ferry, used by
//!   the dynamic-method tests; its descriptor set is written to OUT_DIR for them.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for (file, include, descriptor) in [
        ("proto/ferry/v1/handler.proto", "proto", "ferry_v1.binpb"),
        (
            "tests/proto/inventory/v1/inventory.proto",
            "tests/proto",
            "inventory_v1.binpb",
        ),
    ] {
        println!("cargo:rerun-if-changed={file}");
        let fds = protox::compile([file], [include])?;
        std::fs::write(out.join(descriptor), prost::Message::encode_to_vec(&fds))?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(fds)?;
    }
    Ok(())
}
