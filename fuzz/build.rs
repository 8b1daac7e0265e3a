//! With `ROCKSDB_LIB_DIR` (and `ROCKSDB_STATIC`) set, librocksdb-sys links a
//! RocksDB built before instead of compiling it, and then links no C++
//! standard library either: link it here. scripts/fuzz.sh explains when
//! that saves the long first build.

fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_LIB_DIR");
    if std::env::var_os("ROCKSDB_LIB_DIR").is_some() {
        // After every library, so that --as-needed keeps it.
        println!("cargo:rustc-link-arg=-lstdc++");
    }
}
