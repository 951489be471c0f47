# WebUI entry point: everything lives in lib_klora; this file only picks the host adapter.
from lib_klora.hosts import load_script_class

KLoraScript = load_script_class()
