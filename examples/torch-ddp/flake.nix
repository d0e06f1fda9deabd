{
  # A pcp training binary (docs/trainers.md): examples/torch-ddp/train.py with PyTorch.
  # x86_64-linux gets the CUDA build (the workers' GPUs, NCCL); aarch64-darwin the CPU/MPS build
  # (the shepherd, which in the workers-only layout only hosts the rendezvous store).
  #   nix build .#train        -> result/bin/torch-ddp
  #   pcp run --binary 'github:OWNER/REPO?dir=examples/torch-ddp#train' --layout workers-only
  #   nix build .#env          -> result/bin/{python3,train}, for the torchrun launcher:
  #   pcp run --torchrun 'github:OWNER/REPO?dir=examples/torch-ddp#env!train'
  description = "pcp example: a small PyTorch DistributedDataParallel trainer";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-darwin" ];
      forAll = f: nixpkgs.lib.genAttrs systems f;
      pkgsFor = system: import nixpkgs {
        inherit system;
        config = {
          allowUnfree = true; # CUDA
          cudaSupport = system == "x86_64-linux";
        };
      };
    in
    {
      packages = forAll (system:
        let
          pkgs = pkgsFor system;
          python = pkgs.python3.withPackages (ps: [ ps.torch ]);
        in
        rec {
          train = pkgs.writeShellScriptBin "torch-ddp" ''
            exec ${python}/bin/python ${./train.py} "$@"
          '';
          # The interpreter with torch (and torchrun), for running the script by hand.
          inherit python;
          # For pcp's torchrun launcher: bin/ holds python3 (with torch) and the script as
          # `train`; pcp run --torchrun 'github:OWNER/REPO?dir=examples/torch-ddp#env!train'
          env = pkgs.buildEnv {
            name = "torch-ddp-env";
            paths = [
              python
              (pkgs.writeScriptBin "train" ("#!${python}/bin/python\n" + builtins.readFile ./train.py))
            ];
          };
          default = train;
        });
    };
}
