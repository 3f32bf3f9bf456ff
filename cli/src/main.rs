fn main() { println!("e4m3 (in progress)"); }
