"""Summarise nvcc -Xptxas=-v output: one markdown row per sm_90 kernel (see ptxas_report.md)."""
import re,subprocess,sys
lines=open(sys.argv[1]).read().splitlines()
cur=None;out=[];info={}
for l in lines:
    m=re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'",l)
    if m: cur,arch=m.group(1),m.group(2); info={}; continue
    if cur and 'bytes stack frame' in l: info['stack']=l.strip()
    if cur and 'Used' in l and 'registers' in l:
        out.append((arch,cur,info.get('stack',''),l.split('Used')[1].strip())); cur=None
dem=subprocess.run(['c++filt'],input='\n'.join(o[1] for o in out),capture_output=True,text=True).stdout.splitlines()
for (a,n,s,u),d in zip(out,dem):
    if a!='sm_90': continue
    d=re.sub(r'dnnrl::cuda::(\(anonymous namespace\)::)?','',d)
    d=re.sub(r'\(.*\)$','',d)
    regs=re.search(r'(\d+) registers',u).group(1)
    sm=re.search(r'(\d+) bytes smem',u); sm=sm.group(1) if sm else '0'
    st=re.findall(r'(\d+) bytes',s)
    print(f"| `{d}` | {regs} | {sm} | {st[0] if st else '?'} | {st[1] if st else '?'}/{st[2] if st else '?'} |")
