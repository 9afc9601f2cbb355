#include "app/cli.hpp"

int main(int argc, char** argv) { return p11kms::app::run_cli(argc, argv); }
