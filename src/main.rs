fn main() {
    println!("vrun skeleton");
}
