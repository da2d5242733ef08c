"""The documentation stays true: every command, script, config and flag that
README.md and docs/ name exists, and the cheap commands run."""
import functools
import glob
import os
import os.path as osp
import re
import shlex
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PAGES = sorted(['README.md', 'CHANGELOG.md'] + [
    osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'docs', '*.md'))
])
# the scripts that forward their extra arguments to a Python entry point
FORWARDS = {
    'tools/dist_train.sh': 'tools/train.py',
    'tools/slurm_train.sh': 'tools/train.py',
    'tools/dist_test.sh': 'tools/test.py',
    'tools/slurm_test.sh': 'tools/test.py',
}
PYTHONS = ('python', 'python3', '.venv/bin/python')
# words a documented command may take in place of a real path
PLACEHOLDER = re.compile(r'^[A-Z][A-Z_.0-9]*$|\.\.\.|^\[')
REPO_PATH = re.compile(r'(?<![\w/.$-])((?:configs|tools|docs|mmge|tests)/'
                       r'[\w./*-]*\w)')


def read(page):
    with open(osp.join(ROOT, page), encoding='utf-8') as f:
        return f.read()


def bash_blocks(page):
    return re.findall(r'^```bash\n(.*?)^```', read(page), re.M | re.S)


def expand_loops(lines):
    """``for v in a b; do BODY; done`` (one level) -> BODY per value."""
    out, i = [], 0
    while i < len(lines):
        m = re.match(r'for (\w+) in (.*); do$', lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        end = lines.index('done', i)
        for value in m.group(2).split():
            out += [re.sub(r'\$\{?%s\}?' % m.group(1), value, line)
                    for line in lines[i + 1:end]]
        i = end + 1
    return out


def commands(block):
    """A bash block's commands, one token list each, with its simple
    variables substituted (a ``$(...)`` stands as the word SUBSHELL)."""
    text = re.sub(r'\\\n\s*', ' ', block)
    text = re.sub(r'\$\((?:[^()]|\([^()]*\))*\)', 'SUBSHELL', text)
    lines = [re.sub(r'\s+#.*$|^\s*#.*$', '', line).strip()
             for line in text.splitlines()]
    vars_ = {}
    for line in expand_loops([line for line in lines if line]):
        for name, value in vars_.items():
            line = re.sub(r'\$\{?%s\}?(?!\w)' % name, value, line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|')
        lexer.whitespace_split = True
        tokens = []
        for token in list(lexer) + [';']:
            if token not in ('&&', '||', ';', '|', '&'):
                tokens.append(token)
                continue
            if tokens and tokens[0] == 'export':
                vars_.update(t.split('=', 1) for t in tokens[1:])
                tokens = []
            while tokens and re.match(r'^\w+=', tokens[0]):
                tokens = tokens[1:]
            if tokens:
                yield tokens
            tokens = []


def all_commands():
    return [(page, tokens) for page in PAGES for block in bash_blocks(page)
            for tokens in commands(block)]


@functools.lru_cache(maxsize=None)
def help_text(script):
    out = subprocess.run([sys.executable, script, '--help'], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f'{script} --help: {out.stderr[-2000:]}'
    return out.stdout


def entry_point(tokens):
    """(script, its arguments) of a command, or None for another program."""
    if tokens[0] in PYTHONS and len(tokens) > 1 and tokens[1] != '-c':
        return tokens[1], tokens[2:]
    if tokens[0] == 'bash':
        return tokens[1], tokens[2:]
    if tokens[0].startswith('tools/'):
        return tokens[0], tokens[1:]
    return None


def test_pages_have_commands():
    found = {page for page, _ in all_commands()}
    assert {'README.md', 'docs/get_started.md', 'docs/detection.md',
            'docs/benchmarks.md'} <= found


@pytest.mark.parametrize('page', PAGES)
def test_every_command_names_what_exists(page):
    for block in bash_blocks(page):
        for tokens in commands(block):
            point = entry_point(tokens)
            if point is None or PLACEHOLDER.search(point[0]) or \
                    '.mim/' in point[0]:
                continue
            script, args = point
            where = f'{page}: {" ".join(tokens)}'
            assert osp.isfile(osp.join(ROOT, script)), where
            target = FORWARDS.get(script, script)
            if script in FORWARDS:
                args = args[2:] if 'test' in script else args[1:]
            if target.endswith('.py'):
                usage = help_text(target)
                for arg in args:
                    flag = arg.split('=', 1)[0]
                    if flag.startswith('--'):
                        assert re.search(
                            re.escape(flag) + r'\b', usage), \
                            f'{where}: {target} has no {flag}'
            for arg in args:
                if REPO_PATH.fullmatch(arg):
                    assert osp.exists(osp.join(ROOT, arg)), f'{where}: {arg}'


@pytest.mark.parametrize('page', PAGES)
def test_every_repository_path_exists(page):
    """Paths in prose and code blocks alike (configs, tools, docs, ...)."""
    for path in REPO_PATH.findall(read(page)):
        if PLACEHOLDER.search(path) or '<' in path:
            continue
        assert glob.glob(osp.join(ROOT, path)), f'{page} names {path}'


def test_python_one_liners_run():
    """The ``python -c`` checks of the install instructions."""
    ran = 0
    for page, tokens in all_commands():
        if tokens[0] in PYTHONS and tokens[1:2] == ['-c']:
            out = subprocess.run([sys.executable, '-c', tokens[2]], cwd='/',
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, f'{page}: {out.stderr[-2000:]}'
            ran += 1
    assert ran >= 1


def test_no_words_about_how_mmge_is_developed():
    """The repository speaks to its users, not about its own making."""
    # spelled in pieces, so that this file does not read as one of them
    words = re.compile('|'.join((
        r'\bsessions? [0-9]+', r'\b(issue|task) [0-9]+\b', r'\(issue\b',
        'throw' + 'away', r'\ble' + r'nt\b', r'\ble' + r'ase\b',
        r'\.\./shared\b', r'SPEC\.md', 'PAPER_TABLES',
        r'ENVIRONMENT\.md')), re.I)
    files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()
    assert files, 'the tests run in a git checkout of mmge'
    found = []
    for name in files:
        if name.endswith(('.png', '.json')) or \
                name == osp.relpath(__file__, ROOT):
            continue
        path = osp.join(ROOT, name)
        if not osp.isfile(path):
            continue
        with open(path, encoding='utf-8', errors='replace') as f:
            for number, line in enumerate(f, 1):
                if words.search(line):
                    found.append(f'{name}:{number}: {line.strip()}')
    assert not found, '\n'.join(found)


def test_benchmarks_page_is_short_and_current():
    text = read('docs/benchmarks.md')
    assert len(text.splitlines()) < 250
    # each table of figures comes with its command, machine, versions, date
    for section in re.split(r'^## ', text, flags=re.M)[2:]:
        if '| plain' in section or '| `faster_rcnn' in section:
            assert '```bash' in section, section[:60]
            assert re.search(r'20\d\d-\d\d-\d\d', section), section[:60]
            assert 'torch' in section or 'the same machine' in section, \
                section[:60]


def test_setup_bounds_match_the_tested_versions():
    """setup.py's lower bounds are the versions docs/get_started.md says
    were tested (and CI installs)."""
    setup = read('setup.py')
    tested = read('docs/get_started.md')
    for package in ('torch', 'mmengine', 'mmcv', 'mmdet', 'mmpretrain'):
        bound = re.search(r"'%s>=([\d.]+)" % package, setup)
        assert bound, package
        assert f'{package} {bound.group(1)}' in tested, package
    import mmcv
    import mmdet
    import mmengine
    import mmpretrain
    import torch
    from packaging.version import Version
    for module in (torch, mmengine, mmcv, mmdet, mmpretrain):
        bound = re.search(r"'%s>=([\d.]+)" % module.__name__, setup).group(1)
        assert Version(module.__version__.split('+')[0]) >= Version(bound)
