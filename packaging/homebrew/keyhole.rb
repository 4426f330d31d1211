# Homebrew formula for keyhole, built from the release tag's source with cargo.
#
# In keyhole's repository (packaging/homebrew/) the owner and the sha256 are
# placeholders. For each release, the release job (.github/workflows/release.yml,
# through scripts/release-manifests.sh) attaches a copy with both filled in, the sha256
# being that of GitHub's tarball of the tag: install that one (docs/install.md).
# tests/release_files.rs runs the `test do` block's check-config on every change.
class Keyhole < Formula
  desc "Database proxy: plain Postgres and MySQL on localhost, verified TLS to the server"
  homepage "https://github.com/OWNER/keyhole"
  url "https://github.com/OWNER/keyhole/archive/refs/tags/v0.1.0.tar.gz"
  sha256 "0000000000000000000000000000000000000000000000000000000000000000"
  license "Apache-2.0"
  head "https://github.com/OWNER/keyhole.git", branch: "main"

  depends_on "rust" => :build

  def install
    system "cargo", "install", *std_cargo_args
    # keyhole writes its own completions and man pages, from the same definitions
    # as its flags (as the Debian package does).
    generate_completions_from_executable(bin/"keyhole", "completions")
    system bin/"keyhole", "man", "--out-dir", "man"
    man1.install Dir["man/*.1"]
  end

  test do
    assert_match version.to_s, shell_output("#{bin}/keyhole --version")
    # A configuration checked without a database: nothing is bound or dialled.
    (testpath/"keyhole.toml").write <<~TOML
      targets = [
        "postgres://db.example.com?tls-mode=verify-full",
        "mysql://10.0.0.6?server-name=db.internal",
      ]
      port = 6432
    TOML
    output = shell_output("#{bin}/keyhole check-config --config #{testpath}/keyhole.toml")
    assert_match "127.0.0.1:6432", output
    assert_match "127.0.0.1:6433", output
    assert_match "server name db.internal", output
  end
end
