"The docs site, built by `afd_docs`'s code, served on localhost and read in headless Chromium"
import fcntl, functools, json, os, re, shutil, threading, urllib.request
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import urljoin, urldefrag, urlparse
import pytest

ARTEFACTS = Path(__file__).parent/'artefacts'
API_NAMES = {'learner.html': ['afd_learner', 'AFDLearner'], 'adversarial.html': ['AdversarialFeatureCallback'],
             'core.html': ['PeerModel'], 'data.html': ['digits_dls']}

def _chromium():
    "Headless Chromium through Selenium, with the browser's console log"
    from selenium import webdriver
    browser, driver = shutil.which('chromium') or shutil.which('chromium-browser'), shutil.which('chromedriver')
    if not (browser and driver):
        pytest.fail("The docs test needs Chromium and its driver: apt-get install chromium chromium-driver (.ci/run does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--window-size=1280,1000']:
        opts.add_argument(arg)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))

class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

def _built_site(tmp_path_factory):
    "The site's folder and pages, built once per test run: pytest-xdist's workers share one build, made under a lock"
    from afd_fastai.tools.docs import build_site
    if 'PYTEST_XDIST_WORKER' not in os.environ: # one process
        dest = tmp_path_factory.mktemp('site')
        return dest, build_site(dest)
    shared = tmp_path_factory.getbasetemp().parent # this run's folder, the same for every worker
    dest, listed = shared/'site', shared/'site_pages.json'
    with open(shared/'site.lock', 'w') as lock: # the build writes the repository's _proc and _docs_src: one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not listed.exists(): listed.write_text(json.dumps(build_site(dest)))
    return dest, [tuple(p) for p in json.loads(listed.read_text())]

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "The site built into a temporary folder and served on a free localhost port"
    dest, pages = _built_site(tmp_path_factory)
    server = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(dest)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_port}/', dest, pages
    server.shutdown()

@pytest.fixture(scope='module')
def browser():
    driver = _chromium()
    yield driver
    driver.quit()

def _ids(html): return set(re.findall(r'\bid="([^"]+)"', html))

def test_every_page_loads_links_resolve_images_render(site, browser):
    root, dest, pages = site
    ARTEFACTS.mkdir(exist_ok=True)
    names = ['index'] + [name for _, name, _ in pages]
    assert {'learner', 'adversarial', 'core', 'data', 'short_schedules', 'quick_start', 'own_networks', 'three_networks', 'adversarial_game', 'reproduce_paper', 'methods_compared'} <= set(names)
    ids, links, errors, images = {}, [], [], {}
    for name in names:
        url = urljoin(root, f'{name}.html')
        browser.get(url)
        html = browser.page_source
        ids[f'{name}.html'] = _ids(html)
        errors += [(name, e['message']) for e in browser.get_log('browser') if e['level'] == 'SEVERE']
        hrefs = browser.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
        links += [(name, h) for h in hrefs if urlparse(h).netloc == urlparse(root).netloc]
        images[name] = browser.execute_script("return [...document.images].map(i => [i.src, i.complete ? i.naturalWidth : 0])")
        if name == 'index': browser.save_screenshot(str(ARTEFACTS/'landing.png'))
        if name == 'quick_start': browser.save_screenshot(str(ARTEFACTS/'tutorial.png'))
    assert not errors, f"Console errors: {errors[:5]}"
    broken = []
    for page, href in links:
        target, anchor = urldefrag(href)
        path = urlparse(target).path.lstrip('/') or 'index.html'
        if path.endswith('/'): path += 'index.html'
        if not (dest/path).is_file(): broken.append((page, href)); continue
        if anchor and path.endswith('.html'):
            if path not in ids: ids[path] = _ids((dest/path).read_text(encoding='utf-8'))
            if anchor not in ids[path]: broken.append((page, href))
    assert len(links) > 200 and not broken, f"{len(broken)} broken internal links, e.g. {broken[:5]}"
    for page, n in {'index': 2, 'quick_start': 3, 'adversarial_game': 3, 'methods_compared': 1, 'interpret': 3, 'short_schedules': 2}.items():
        assert len(images[page]) >= n, f"{page} shows {len(images[page])} images, expected at least {n}"
    empty = [(name, src) for name, imgs in images.items() for src, width in imgs if not width]
    assert not empty, f"Images that did not render: {empty[:5]}"
    assert (ARTEFACTS/'landing.png').stat().st_size > 10_000 and (ARTEFACTS/'tutorial.png').stat().st_size > 10_000

def test_api_pages_hold_the_signatures(site, browser):
    root, dest, _ = site
    for page, names in API_NAMES.items():
        browser.get(urljoin(root, page))
        text = browser.find_element('tag name', 'body').text
        for name in names: assert f'{name}(' in text, f"{page} lacks the signature of {name}"
        assert '| **Type** |' not in text and 'Details' in text # the parameter table is rendered as a table
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(urljoin(root, 'search.html?q=discriminator'))
    found = WebDriverWait(browser, 20).until(lambda b: b.find_elements('css selector', '#search-results li'))
    pages = {a.get_attribute('href').split('/')[-1].split('?')[0] for li in found for a in li.find_elements('tag name', 'a')}
    assert 'adversarial.html' in pages, pages # the search finds the page of AFD's discriminators

def _module_of(page):
    "The module an API page documents: its notebook's `default_exp` (page `fair` is `fairness.methods`)"
    nb, = [f for f in (Path(__file__).parent.parent/'nbs').glob('*.ipynb') if re.fullmatch(rf'\d+_{page}\.ipynb', f.name)]
    return re.search(r'#\|\s*default_exp\s+([\w.]+)', nb.read_text(encoding='utf-8')).group(1)

def test_every_public_name_is_on_its_api_page(site):
    "Functions and classes under a `show_doc` heading (their anchor), other public names in the page's text"
    import importlib, inspect
    root, dest, pages = site
    api = [name for section, name, _ in pages if section == 'API' and name != 'all']
    assert len(api) >= 17
    missing = []
    for page in api:
        mod = importlib.import_module(f'afd_fastai.{_module_of(page)}')
        html = (dest/f'{page}.html').read_text(encoding='utf-8')
        ids = _ids(html)
        for name in mod.__all__:
            obj = getattr(mod, name)
            documented = name.lower() in ids if inspect.isfunction(obj) or inspect.isclass(obj) else f'>{name}<' in html
            if not documented: missing.append(f'{page}.{name}')
    assert not missing, f"Public names without documentation on their page: {missing}"

def test_readme_pictures_are_the_pages_outputs():
    "Each picture the README shows is, byte for byte, an output of an executed page, so re-executing a page with new runs cannot leave a stale copy"
    import base64
    root = Path(__file__).parent.parent
    shown = re.findall(r'!\[[^\]]*\]\((images/[^)]+\.png)\)', (root/'README.md').read_text())
    assert len(shown) >= 2, f"the README shows {len(shown)} pictures from images/, expected at least 2"
    outputs = {base64.b64decode(''.join(o['data']['image/png'])) for nb in (root/'nbs').glob('*.ipynb')
               for c in json.loads(nb.read_text())['cells'] for o in c.get('outputs', []) if 'image/png' in o.get('data', {})}
    stale = [p for p in shown if (root/p).read_bytes() not in outputs]
    assert not stale, f"{stale} differ from every page's output: save the page's plot to the file again after executing it"
