fn main() {
    print!("{}", meshfed_api::crd_yaml());
}
