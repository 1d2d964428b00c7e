// main() for the fuzz targets when they are not linked with libFuzzer (any
// compiler, every build): runs each file of the seed corpus, then a number
// of pseudo-random inputs from a fixed seed, through LLVMFuzzerTestOneInput.
// meson test runs it (suite 'fuzz'), so the targets and their invariants are
// exercised on every test run and cannot rot.
//
//   fuzz-<target>-driver [--random N] [--seed S] [--max-len L] [PATH...]
//
// PATH is a file or a directory of files (the libFuzzer corpus layout). Each
// input is copied into a heap buffer of exactly its size, so a sanitizer
// build catches a read past its end.
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

void run_one(const std::vector<uint8_t>& input) {
    // An exactly sized allocation; new[0] still gives a unique pointer.
    std::unique_ptr<uint8_t[]> copy(new uint8_t[input.size()]);
    if (!input.empty()) std::memcpy(copy.get(), input.data(), input.size());
    LLVMFuzzerTestOneInput(copy.get(), input.size());
}

bool read_file(const std::string& path, std::vector<uint8_t>& out) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    out.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    return !f.bad();
}

// Files named by PATH (itself, or a directory's regular files, sorted).
std::vector<std::string> expand(const std::string& path) {
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0) {
        std::fprintf(stderr, "fuzz driver: cannot stat %s: %s\n", path.c_str(), std::strerror(errno));
        std::exit(2);
    }
    if (!S_ISDIR(st.st_mode)) return {path};
    std::vector<std::string> files;
    DIR* dir = ::opendir(path.c_str());
    if (!dir) {
        std::fprintf(stderr, "fuzz driver: cannot open %s: %s\n", path.c_str(), std::strerror(errno));
        std::exit(2);
    }
    while (const dirent* e = ::readdir(dir)) {
        if (e->d_name[0] == '.') continue;
        const std::string file = path + "/" + e->d_name;
        struct stat fst{};
        if (::stat(file.c_str(), &fst) == 0 && S_ISREG(fst.st_mode)) files.push_back(file);
    }
    ::closedir(dir);
    std::sort(files.begin(), files.end());
    return files;
}

// splitmix64: small, fixed, and the same everywhere.
uint64_t next_random(uint64_t& state) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

unsigned long parse_number(const char* flag, const char* text) {
    char* end = nullptr;
    errno = 0;
    const unsigned long v = std::strtoul(text, &end, 0);
    if (errno != 0 || end == text || *end != '\0') {
        std::fprintf(stderr, "fuzz driver: %s needs a number, got '%s'\n", flag, text);
        std::exit(2);
    }
    return v;
}

}  // namespace

int main(int argc, char** argv) {
    unsigned long random_inputs = 0, max_len = 512;
    uint64_t seed = 1;
    std::vector<std::string> paths;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        const bool has_value = i + 1 < argc;
        if (arg == "--random" && has_value) {
            random_inputs = parse_number("--random", argv[++i]);
        } else if (arg == "--seed" && has_value) {
            seed = parse_number("--seed", argv[++i]);
        } else if (arg == "--max-len" && has_value) {
            max_len = parse_number("--max-len", argv[++i]);
        } else if (arg.rfind("--", 0) == 0) {
            std::fprintf(stderr, "usage: %s [--random N] [--seed S] [--max-len L] [PATH...]\n", argv[0]);
            return 2;
        } else {
            paths.push_back(arg);
        }
    }

    size_t files = 0;
    std::vector<uint8_t> input;
    for (const auto& path : paths) {
        for (const auto& file : expand(path)) {
            if (!read_file(file, input)) {
                std::fprintf(stderr, "fuzz driver: cannot read %s\n", file.c_str());
                return 2;
            }
            run_one(input);
            ++files;
        }
    }
    if (!paths.empty() && files == 0) {
        std::fprintf(stderr, "fuzz driver: no corpus files under the given paths\n");
        return 2;
    }

    uint64_t state = seed;
    for (unsigned long i = 0; i < random_inputs; ++i) {
        input.resize(next_random(state) % (max_len + 1));
        for (auto& b : input) b = static_cast<uint8_t>(next_random(state));
        run_one(input);
    }
    std::printf("fuzz driver: %zu corpus files and %lu random inputs (seed %llu, up to %lu bytes): all invariants held\n",
                files, random_inputs, static_cast<unsigned long long>(seed), max_len);
    return 0;
}
