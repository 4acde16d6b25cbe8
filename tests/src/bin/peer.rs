//! `peer`: the TCP test server/client (see [`sockmesh_tests::peer`]).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(sockmesh_tests::peer::run(&args));
}
